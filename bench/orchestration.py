"""Orchestration overhead of a sweep, and the cost of re-running a finished one.

Runs a sweep of N trials of the tiny model through the real CLI (local Ray, Tune), then
prints: sweep wall time, the sum of the trials' own wall times (done.json), the
overhead per trial = (wall - sum of trial times / concurrency) / N, and the time of the
same command again (it must train nothing; target for the demo: under 30 s).

    .venv/bin/python bench/orchestration.py [--trials 6] [--steps 4]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "datasets" / "french_demo"


def experiment(n_trials: int, steps: int) -> str:
    seeds = list(range(n_trials))
    return f"""
defaults: [base, _self_]
model: {{name: tiny-random}}
data: {{train: {DEMO / 'train.jsonl'}, n_train: 16, questions: {DEMO / 'eval_questions.jsonl'}, n_questions: 4,
        heldout: {DEMO / 'heldout_trait.jsonl'}, n_heldout: 4}}
train: {{max_steps: {steps}, batch_size: 4, grad_accum: 1, checkpoints: final, lora: {{r: 4, alpha: 8}}, max_seq_len: 96}}
eval: {{max_new_tokens: 6, batch_size: 8}}
sweep:
  arms: [{{defense: {{kind: none}}, seed: {seeds}}}]
"""


def run(project: Path, *args: str) -> float:
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "raysweep.sweep.run", "exp=bench", *args], cwd=project,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(proc.stdout[-3000:] + proc.stderr[-3000:])
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--trials", type=int, default=6)
    ap.add_argument("--steps", type=int, default=4)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        project = Path(tmp)
        (project / "experiments").mkdir()
        (project / "experiments" / "bench.yaml").write_text(experiment(args.trials, args.steps))
        wall = run(project)
        done = [json.loads(p.read_text()) for p in (project / "runs" / "bench" / "trials").glob("*/done.json")]
        assert len(done) == args.trials, len(done)
        trial_sum = sum(d["wall_s"] for d in done)
        concurrency = 2  # the local Ray's CPUs, one per trial
        rerun = run(project)
    overhead = (wall - trial_sum / concurrency) / args.trials
    print(f"trials: {args.trials}, steps each: {args.steps}, concurrency: {concurrency}")
    print(f"sweep wall time:                  {wall:7.1f} s")
    print(f"sum of trial times:               {trial_sum:7.1f} s  (ideal wall at {concurrency}x: {trial_sum / concurrency:.1f} s)")
    print(f"orchestration overhead per trial: {overhead:7.1f} s")
    print(f"re-run of the finished sweep:     {rerun:7.1f} s  (trains nothing; target < 30 s)")
    print(f"ratio wall / ideal:               {wall / (trial_sum / concurrency):7.2f}")


if __name__ == "__main__":
    main()
