"""The committed reference rows are reproducible: a fresh run at the reference settings gives the same row.

One cheap reference row (leaderboard/reference_environment.json "rerun": source_only on phantom_mri2ct at one
thread, evaluated on the 12 target-test cases) is checked two ways, the price of knowing that `leaderboard/`
still describes the code (a change that moves the reference numbers fails here until the rows are regenerated
in the same commit, leaderboard/README.md):

- from the committed source weights (leaderboard/source_models/), imported with `sfdabench source import`:
  the row's Dice/ASD/HD95 within 1e-4 for every organ. Evaluation only, so it runs on any machine.
- from scratch, opt-in (``SFDABENCH_RETRAIN_REFERENCE=1``): the source model retrained (~6 min on one core) must
  have the committed weights hash and give the same row. Bit-reproducible training holds only on the software
  and CPU the weights were made with; elsewhere this test skips and says what differs. It is not in the default
  suite: run beside the other tests it took one of CI's two cores for the whole suite (1823 s instead of ~760 s
  on the reference machine), and the imported-weights rerun above already pins the rows to the code.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO
from sfdabench.harness.results import cpu_model, read_rows
from sfdabench.harness.source_model import weights_hash

REFERENCE = REPO / "leaderboard"
ENVIRONMENT = json.loads((REFERENCE / "reference_environment.json").read_text())
RERUN = ENVIRONMENT["rerun"]
TASK, METHOD, SEED = RERUN["task"], RERUN["method"], int(RERUN["seed"])
WEIGHTS = REFERENCE / RERUN["weights"]
METRICS = ["dice", "asd", "hd95"]
RUN_ARGS = ["run", f"method={METHOD}", f"task={TASK}", f"seed={SEED}", f"num_threads={ENVIRONMENT['num_threads']}",
            "progress=false"]

RETRAIN_VARIABLE = "SFDABENCH_RETRAIN_REFERENCE"


def reference_environment_differs() -> str:
    here = {"torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "cpu_model": cpu_model()}
    return ", ".join(f"{k} {here[k]!r} (reference {ENVIRONMENT[k]!r})" for k in here if here[k] != ENVIRONMENT[k])


def retrain_skip_reason() -> str:
    """Why the from-scratch retraining does not run here ("" when it does)."""
    if os.environ.get(RETRAIN_VARIABLE) != "1":
        return f"opt-in: set {RETRAIN_VARIABLE}=1 to retrain the reference source model (~6 min on one core)"
    differs = reference_environment_differs()
    return f"not the reference environment: {differs}; source training reproduces only there" if differs else ""


def committed_row():
    committed = read_rows(REFERENCE / f"{TASK}.csv", METRICS)
    ref = committed[(committed.method == METHOD) & (committed.seed == SEED)].set_index("organ")
    assert len(ref), f"no committed {METHOD} seed {SEED} row in leaderboard/{TASK}.csv"
    return ref


def assert_same_row(new, ref):
    assert set(new.source_weights) == set(ref.source_weights), "other source weights"
    assert set(new.index) == set(ref.index)
    for organ in ref.index:
        for metric in METRICS:
            assert new.loc[organ, metric] == pytest.approx(ref.loc[organ, metric], abs=1e-4, nan_ok=True), \
                (organ, metric)
    assert (new.n_cases == ref.n_cases.iloc[0]).all() and int(ref.n_cases.iloc[0]) >= 12


def sfdabench(*args: str, cwd) -> str:
    done = subprocess.run([sys.executable, "-m", "sfdabench", *args], cwd=cwd, capture_output=True, text=True)
    assert done.returncode == 0, (done.stdout + done.stderr)[-2000:]
    return done.stdout


def test_the_committed_source_weights_are_those_of_the_reference_row():
    assert weights_hash(WEIGHTS) in set(committed_row().source_weights)


@pytest.mark.slow
def test_the_reference_row_reruns_from_the_committed_source_weights(tmp_path):
    results = tmp_path / "res"
    sfdabench("source", "import", str(WEIGHTS), f"task={TASK}", f"seed={SEED}", f"results_dir={results}",
              cwd=tmp_path)
    sfdabench(*RUN_ARGS, f"results_dir={results}", cwd=tmp_path)
    assert_same_row(read_rows(results / "leaderboard.csv", METRICS).set_index("organ"), committed_row())


@pytest.mark.slow
def test_the_reference_source_model_retrains_to_the_committed_weights(tmp_path):
    if retrain_skip_reason():
        pytest.skip(retrain_skip_reason())
    results = tmp_path / "res"
    sfdabench(*RUN_ARGS, f"results_dir={results}", cwd=tmp_path)
    new = read_rows(results / "leaderboard.csv", METRICS).set_index("organ")
    assert set(new.source_weights) == {weights_hash(WEIGHTS)}, "other source weights: the source recipe moved"
    assert_same_row(new, committed_row())
