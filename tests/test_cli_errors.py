"""Every user mistake: one line naming the problem and the fix, non-zero exit, no traceback, nothing written.

Most cases run the CLI in-process (``cli.main``: no 4 s interpreter start per case); one runs it as a user
would, in a subprocess. Nothing here trains more than the tiny phantom source model of ``TINY_PHANTOM``.
"""
from __future__ import annotations

import re
from pathlib import Path

import pandas as pd
import pytest
import yaml
import torch

from conftest import TINY_PHANTOM, run_cli
from sfdabench import cli
from sfdabench.harness.config import CONFIG_PATH_ENV
from sfdabench.harness.plugins import get_registry

REPO = Path(__file__).resolve().parents[1]
LOG_LINE = re.compile(r"^\[\d\d:\d\d:\d\d \S+ [A-Z]+\] ")


@pytest.fixture
def files(tmp_path):
    """A results folder (not created), a plain file in the way, a garbage and a non-SAM weights file."""
    (tmp_path / "a_file").write_text("not a folder\n")
    (tmp_path / "garbage.pth").write_bytes(b"\x00not a checkpoint" * 10)
    torch.save({"foo.weight": torch.zeros(3)}, tmp_path / "not_sam.pth")
    return {"res": tmp_path / "res", "file": tmp_path / "a_file", "garbage": tmp_path / "garbage.pth",
            "not_sam": tmp_path / "not_sam.pth", "missing": tmp_path / "missing.pth"}


def _main(capsys, *argv: str) -> tuple[int, str, list[str]]:
    """(exit code, stdout, stderr lines) of ``sfdabench ARGV`` run in this process."""
    code = cli.main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err.splitlines()


def _nothing_left(res: Path) -> None:
    runs = res / "runs"
    assert not runs.exists() or not any(runs.iterdir()), list(runs.iterdir())
    board = res / "leaderboard.csv"
    assert not board.exists() or len(pd.read_csv(board)) == 0
    assert not (res / "hydra").exists() and not (res / "sweeps").exists()


RUN = ["run", "progress=false", *TINY_PHANTOM]

# (argv after RUN, exit code, text of the one line). {res}, {file}, ... are the paths of the `files` fixture.
BAD_RUNS = [
    (["seed=abc"], 2, "seed must be a non-negative integer, got 'abc'"),
    (["seed=1.5"], 2, "seed must be a non-negative integer, got 1.5"),
    (["seed=-3"], 2, "seed must be a non-negative integer"),
    (["num_threads=-1"], 2, "num_threads must be a positive integer or null, got -1"),
    (["metrics.asd_unit=furlong"], 2, "metrics.asd_unit='furlong' is not one of mm, voxel"),
    (["metrics.empty_policy=zero"], 2, "metrics.empty_policy='zero' is not one of diagonal, nan"),
    (["metrics.asd_reduction=median"], 2, "asd_reduction must be one of"),
    (["eval.batch_size=0"], 2, "eval.batch_size must be a positive integer, got 0"),
    (["source_min_dice.mean=1.5"], 2, "source_min_dice.mean=1.5 is not a Dice in [0, 1]"),
    (["source.epochs=0"], 2, "source.epochs must be a positive integer"),
    (["progress=maybe"], 2, "progress must be true or false"),
    (["device=tpu"], 2, "unknown device 'tpu'"),
    (["results_dir={file}/res"], 2, "results_dir={file}/res cannot be created: {file} is a file"),
    (["cache_dir={file}/cache"], 2, "cache_dir={file}/cache cannot be created: {file} is a file"),
    (["method=dfg", "method.fa.iteratons=3"], 2,
     "unknown config key 'method.fa.iteratons' for method=dfg; did you mean method.fa.iterations=3?"),
    (["seeed=1"], 2, "unknown config key 'seeed'; did you mean seed=1?"),
    (["task.sourc.params.size=64"], 2, "did you mean task.source.params.size=64?"),
    (["method.fa=3"], 2, "unknown config key 'method.fa' for method=source_only; sfdabench run "
                         "method=source_only --cfg job lists the valid keys"),  # nothing close: no guess
    (["task.organs=5"], 2, "task.organs must be a non-empty list of organ names, got 5"),
    (["seed=0,1"], 2, "To sweep over it, add --multirun"),
    (["--frobnicate"], 2, "unknown option '--frobnicate'"),
    (["--config-dir", "{res}/nope"], 2, "config folder {res}/nope does not exist"),
    (["-m", "--cfg", "job"], 2, "cannot be combined"),
    (["-m", "method=source_only", "seed=0,abc"], 2, "seed must be a non-negative integer, got 'abc'"),  # 2nd job
    # SAM: cheap checks before Hydra starts ...
    (["method=dfg", "sam=medsam"], 2, "SAM backend 'medsam' has no checkpoint configured"),
    (["method=dfg", "sam=medsam", "sam.checkpoint={missing}"], 2, "checkpoint {missing} not found"),
    (["method=dfg", "sam.checkpoint={missing}"], 2, "LiteMedSAM checkpoint {missing} not found"),
    (["method=dfg", "sam.precision=fp8"], 2, "sam.precision='fp8' is not supported"),
    (["method=dfg", "sam=sam", "sam.model_type=vit_x", "sam.checkpoint={garbage}"], 2, "sam.model_type='vit_x'"),
    # ... and the weights themselves when the protocol builds the backend, before any training
    (["method=dfg", "sam=medsam", "sam.checkpoint={garbage}"], 1, "cannot read SAM checkpoint {garbage}"),
    (["method=dfg", "sam.checkpoint={not_sam}"], 1, "does not match the expected architecture LiteMedSAM"),
]


@pytest.mark.parametrize("args, code, expected", BAD_RUNS, ids=[" ".join(a) for a, _, _ in BAD_RUNS])
def test_bad_input_is_one_line_and_leaves_nothing(capsys, files, args, code, expected):
    res = files["res"]
    fill = {k: str(v) for k, v in files.items()}
    argv = [*RUN, f"results_dir={res}", *(a.format(**fill) for a in args)]
    got, _, err = _main(capsys, *argv)
    assert got == code, err
    assert len(err) == 1, err  # no log line either: everything is checked before anything runs
    assert err[0].startswith("sfdabench: error: ") and expected.format(**fill) in err[0], err
    assert "Traceback" not in "\n".join(err)
    _nothing_left(res)
    assert not (res / "cache" / "source").exists()  # SAM failures came before the source training


def test_bad_input_in_a_real_process(tmp_path):
    res = tmp_path / "res"
    out = run_cli("run", "method=dfg", "method.fa.iteratons=3", f"results_dir={res}", "preset=test", cwd=tmp_path)
    assert out.returncode == 2
    assert out.stderr.splitlines() == ["sfdabench: error: unknown config key 'method.fa.iteratons' for method=dfg; "
                                       "did you mean method.fa.iterations=3? (to add a new key write "
                                       "+method.fa.iteratons=3)"]
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # not even results_dir


@pytest.mark.parametrize("argv, code, expected", [
    (["prepare", "seed=abc"], 2, "seed must be a non-negative integer"),
    (["prepare", "-m", "task=phantom_mri2ct"], 2, "prepare takes no -m"),
    (["ablate", "method=dfg", "task=phantom_mri2ct", "seeds=[0]", "variants=[fa-only]", "eval.batch_size=0"], 2,
     "eval.batch_size must be a positive integer"),
    (["ablate", "--frobnicate"], 2, "unknown option '--frobnicate' for ablate"),
])
def test_prepare_and_ablate_check_the_same_way(capsys, tmp_path, argv, code, expected):
    res = tmp_path / "res"
    got, _, err = _main(capsys, *argv, f"results_dir={res}", "preset=test")
    assert got == code and len(err) == 1 and err[0].startswith("sfdabench: error: ") and expected in err[0], err
    assert not res.exists()


@pytest.mark.parametrize("command", ["run", "list", "prepare", "ablate", "leaderboard", "compare", "report"])
@pytest.mark.parametrize("flag", ["-h", "--help"])
def test_help_of_every_subcommand(capsys, command, flag):
    try:
        code = cli.main([command, flag])
    except SystemExit as exc:  # the argparse-based commands exit from parse_args
        code = exc.code
    out = capsys.readouterr()
    assert code == 0 and out.out.startswith(f"usage: sfdabench {command}"), out
    assert out.err == ""


def test_flags_after_overrides(capsys):
    code, out, err = _main(capsys, "run", "method=dfg", "--cfg", "job")
    method = yaml.safe_load(out)["method"] if code == 0 else {}
    assert code == 0 and method["name"] == "dfg" and not err, err
    code, out, err = _main(capsys, "run", "method=dfg", "sam=medsam", "--cfg", "job", "--package", "sam")
    assert code == 0 and "name: medsam" in out, err  # printing a config needs no checkpoint


def _user_task(folder: Path) -> Path:
    """A task of one's own: the phantom task under another name, in a plain folder."""
    text = (REPO / "configs" / "task" / "phantom_mri2ct.yaml").read_text()
    assert "name: phantom_mri2ct" in text
    (folder / "task").mkdir(parents=True)
    (folder / "task" / "mytask.yaml").write_text(text.replace("name: phantom_mri2ct", "name: mytask"))
    return folder


@pytest.mark.parametrize("route", ["--config-dir", "--config-dir=", "hydra.searchpath", "env"])
def test_user_task_folder(capsys, monkeypatch, tmp_path, route):
    folder = _user_task(tmp_path / "my configs")  # a space in the path, as in real home folders
    code, _, err = _main(capsys, "run", "task=mytask", "--cfg", "job")
    assert code == 2 and "unknown task 'mytask'" in err[0] and "--config-dir" in err[0]
    extra = {"--config-dir": ["--config-dir", str(folder)], "--config-dir=": [f"--config-dir={folder}"],
             "hydra.searchpath": [f"hydra.searchpath=['file://{folder}']"], "env": []}[route]
    if route == "env":
        monkeypatch.setenv(CONFIG_PATH_ENV, str(folder))
    code, out, err = _main(capsys, "run", "task=mytask", *extra, "--cfg", "job")
    assert code == 0 and "\n  name: mytask\n" in out and "dataset: phantom" in out, err
    code, out, err = _main(capsys, "prepare", "task=mytask", *extra, f"results_dir={tmp_path / 'res'}")
    assert code == 0 and "task mytask" in out and "nothing to prepare" in out, err


def test_ctrl_c_during_run_removes_only_the_unfinished_run(capsys, monkeypatch, tmp_path):
    res = tmp_path / "res"
    args = [f"results_dir={res}", "progress=false", *TINY_PHANTOM]
    code, out, err = _main(capsys, "run", "method=source_only", *args)
    assert code == 0, err
    assert not (res / "hydra").exists() and not (res / "sweeps").exists()  # Hydra wrote nothing of its own
    (finished,) = (res / "runs").iterdir()
    checkpoints = sorted((res / "cache" / "source").glob("*.pt"))
    assert checkpoints

    oracle = get_registry().get("methods", "oracle")
    reached = []

    def interrupted(self, source_model, target_train, context):
        reached.append(context.run_dir)  # the run folder exists by now
        assert context.run_dir.is_dir()
        raise KeyboardInterrupt

    monkeypatch.setattr(oracle, "adapt", interrupted)
    code, out, err = _main(capsys, "run", "method=oracle", *args)
    assert reached and code == 130
    err = [line for line in err if not LOG_LINE.match(line)]  # the run's own progress lines came before
    assert len(err) == 1 and err[0].startswith("sfdabench: error: interrupted (Ctrl-C); "), err
    assert "run the same command again" in err[0]
    assert [p.name for p in (res / "runs").iterdir()] == [finished.name]  # the unfinished one is gone
    assert sorted((res / "cache" / "source").glob("*.pt")) == checkpoints
    assert set(pd.read_csv(res / "leaderboard.csv")["method"]) == {"source_only"}


def test_ctrl_c_during_prepare(capsys, monkeypatch, tmp_path):
    phantom = get_registry().get("datasets", "phantom")

    def interrupted(self, *a, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(phantom, "prepare", interrupted, raising=False)
    code, _, err = _main(capsys, "prepare", "task=phantom_mri2ct", f"results_dir={tmp_path / 'res'}")
    assert code == 130
    assert len(err) == 1 and err[0].startswith("sfdabench: error: interrupted (Ctrl-C); "), err
