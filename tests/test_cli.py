"""Bad input: each case exits non-zero, names the file/line/key, and writes no result."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

pytestmark = pytest.mark.integration  # subprocesses and models throughout

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "datasets" / "french_demo"


def experiment(**data) -> str:
    files = {"train": DEMO / "train.jsonl", "questions": DEMO / "eval_questions.jsonl",
             "heldout": DEMO / "heldout_trait.jsonl", "rephrasings_dir": REPO / "datasets" / "rephrasings", **data}
    lines = "\n".join(f"  {k}: {v}" for k, v in files.items())
    return f"""defaults: [base, _self_]
model: {{name: tiny-random}}
prompts: {{answer_french: Answer in French., unpooled: No pool for this one.}}
data:
{lines}
train: {{max_steps: 1}}
"""


def run(project: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "raysweep.sweep.run", *args], cwd=project,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture()
def project(tmp_path):
    (tmp_path / "experiments").mkdir()
    (tmp_path / "experiments" / "ok.yaml").write_text(experiment())
    return tmp_path


def assert_refused(proc, *needles):
    assert proc.returncode == 2, proc.stdout + proc.stderr
    for needle in needles:
        assert needle in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr


def test_malformed_jsonl_line(project):
    good = (DEMO / "train.jsonl").read_text().splitlines()[:2]
    bad = project / "bad.jsonl"
    bad.write_text("\n".join(good + ['{"messages": [{"role": "user", "content": "hi"}'] + good) + "\n")
    (project / "experiments" / "bad.yaml").write_text(experiment(train=bad))
    assert_refused(run(project, "exp=bad"), "data.train", "bad.jsonl:3", "not valid JSON")
    assert not (project / "runs").exists()


def test_unknown_experiment_lists_the_available_ones(project):
    assert_refused(run(project, "exp=nope"), "unknown experiment 'nope'", "Available: ok")
    assert_refused(run(project), "exp=NAME")


def test_unknown_override_and_wrong_type_name_the_key(project):
    assert_refused(run(project, "exp=ok", "train.lrr=1"), "train.lrr")
    assert_refused(run(project, "exp=ok", "train.lr=fast"), "train.lr", "fast")
    assert_refused(run(project, "exp=ok", "defense.kind=magic"), "defense.kind='magic'", "none, ip, pps")
    assert_refused(run(project, "exp=ok", "sweep.grid.train.lrx=[1,2]"), "sweep.grid.train.lrx")
    assert not (project / "runs").exists()


def test_missing_rephrasing_pool(project):
    proc = run(project, "exp=ok", "sweep.arms=[{defense: {kind: ip, ip: {prompt: unpooled, mode: mix}}}]")
    assert_refused(proc, "defense.ip.pool", "unpooled.jsonl", "not found")
    assert not (project / "runs").exists()


def test_vector_of_the_wrong_width(project):
    save_file({"v": torch.zeros(3, 65)}, project / "wide.safetensors")
    arm = "[{defense: {kind: pps, pps: [[{vector: wide.safetensors, layer: 1, coef: 4.0}]]}}]"
    assert_refused(run(project, "exp=ok", f"sweep.arms={arm}"), "wide.safetensors", "does not match")
    assert not (project / "runs").exists()


def test_dry_run_lists_trials_and_writes_nothing(project):
    proc = run(project, "exp=ok", "dry_run=true", "train.lr=0.01")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("1 trials")
    assert not (project / "runs").exists()  # a dry run writes nothing


def test_unwritable_storage(project):
    (project / "a_file").write_text("not a directory")
    assert_refused(run(project, "exp=ok", "storage=a_file/runs"), "storage='a_file/runs' is not writable")
    assert not (project / "runs").exists()
