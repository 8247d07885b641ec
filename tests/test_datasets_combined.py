"""The `combined` dataset adapter: several datasets as one domain, cases named <part>/<case id>."""
from __future__ import annotations

import numpy as np
import pytest

from sfdabench.api import SfdaBenchError
from sfdabench.harness.config import compose_run_config
from sfdabench.harness.plugins import get_registry

ORGANS = ["spleen", "right_kidney", "left_kidney", "liver"]


def combined(tmp_path, splits, parts=None):
    parts = parts or {"a": {"dataset": "phantom", "params": {"modality": "ct", "size": 48, "num_slices": 3}},
                      "b": {"dataset": "phantom", "params": {"modality": "mr", "size": 48, "num_slices": 3}}}
    cfg = {"dataset": "combined", "params": {"parts": parts}, "splits": splits}
    return get_registry().get("datasets", "combined")(cfg, ORGANS, tmp_path)


def test_cases_of_two_datasets_form_one_domain(tmp_path):
    adapter = combined(tmp_path, {"train": ["a/phantom-ct-0001", "b/phantom-mr-0001"], "test": ["a/phantom-ct-0002"]})
    assert adapter.case_ids("train") == ["a/phantom-ct-0001", "b/phantom-mr-0001"]
    with pytest.raises(SfdaBenchError, match="not a case of this phantom domain: '1'"):
        combined(tmp_path, {"train": ["a/1"]}).case_ids("train")        # each part checks its own ids
    a1, b1 = (adapter.load_case(c) for c in adapter.case_ids("train"))
    assert (a1.case_id, b1.case_id) == ("a/phantom-ct-0001", "b/phantom-mr-0001")  # the part's own id, prefixed
    assert not np.array_equal(a1.image, b1.image)            # each part read by its own adapter and params
    alone = get_registry().get("datasets", "phantom")(
        {"params": {"modality": "ct", "size": 48, "num_slices": 3}, "splits": {"train": [1]}}, ORGANS, tmp_path)
    np.testing.assert_array_equal(a1.image, alone.load_case("phantom-ct-0001").image)
    assert adapter.fingerprint([a1.case_id]) != adapter.fingerprint([b1.case_id])


@pytest.mark.parametrize("splits, message", [
    ({"train": ["c/1"]}, "case 'c/1' is not <part>/<case id> of a known part (a, b)"),
    ({"train": ["1"]}, "case '1' is not <part>/<case id>"),
    ({"train": "rest"}, "splits.train must list <part>/<case id> entries"),
])
def test_bad_case_ids_name_the_parts(tmp_path, splits, message):
    with pytest.raises(SfdaBenchError, match=message.replace("(", r"\(").replace(")", r"\)")):
        combined(tmp_path, splits)


def test_parts_need_a_dataset(tmp_path):
    with pytest.raises(SfdaBenchError, match="part 'x' has no 'dataset'"):
        combined(tmp_path, {"train": ["x/1"]}, parts={"x": {"params": {}}})
    with pytest.raises(SfdaBenchError, match="params.parts is empty"):
        get_registry().get("datasets", "combined")({"params": {}, "splits": {}}, ORGANS, tmp_path)


def test_sample_mri2ct_target_is_both_real_ct_volumes(sample_data, tmp_path):
    """The real task's target: AMOS amos_0018 and IRCADb 1.1, every organ labelled, one frame and window."""
    cfg = compose_run_config(["task=sample_mri2ct", f"cache_dir={tmp_path}"])
    adapter = get_registry().get("datasets", cfg.task.target.dataset)(cfg.task.target, list(cfg.task.organs),
                                                                      tmp_path)
    assert adapter.case_ids("train") == adapter.case_ids("test") == ["amos/0018", "ircadb/1.1"]
    assert "transductive" in cfg.task.data_protocol
    for cid in adapter.case_ids("test"):
        case = adapter.load_case(cid)
        assert case.image.shape[1:] == (cfg.task.size,) * 2 and 0 <= case.image.min() and case.image.max() <= 1
        counts = np.bincount(case.label.ravel(), minlength=5)
        assert (counts[1:] > 0).all(), (cid, counts)
        liver = np.argwhere(case.label == 4).mean(axis=0)
        spleen = np.argwhere(case.label == 1).mean(axis=0)
        assert liver[2] < spleen[2], cid                    # liver on the image left, spleen on the right
