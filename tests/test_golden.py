"""Golden tests: what the engine computes today, recorded, so that a change of structure
(issue 14: stage packages, one conversation builder, one scoring kernel) is shown to keep
behaviour. A change that alters a number on purpose re-records the file in its own commit:

    RAYSWEEP_RECORD_GOLDEN=1 .venv/bin/python -m pytest tests/test_golden.py

Recorded: the trial ids of every experiment file; the tables of the demo's design on the tiny
model; the heuristics and mech tables of the tiny experiments. Tables are compared sorted by
their keys, text and integers exactly, floats to 1e-6 relative (the same arithmetic in another
order may move the last bits); run-specific columns (paths, times, nodes) are left out."""

import json
import os
from pathlib import Path

import polars as pl
import pytest
from polars.testing import assert_frame_equal

from raysweep.config import available_experiments, load_config

REPO = Path(__file__).resolve().parents[1]
GOLDEN = REPO / "tests" / "golden"
RECORD = os.environ.get("RAYSWEEP_RECORD_GOLDEN") == "1"
VOLATILE = {"config", "exp_dir", "node_id", "node_ip", "started", "finished", "seconds", "time", "duration_s",
            "wall_s", "attempt", "error", "host"}
TINY = ["model.name=tiny-random", "train.max_steps=2", "data.n_train=8", "data.n_questions=2", "data.n_heldout=2",
        "eval.max_new_tokens=8", "train.batch_size=2", "train.grad_accum=2"]


def _recorded(name: str, value):
    path = GOLDEN / name
    if RECORD:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(value, indent=1, sort_keys=True) + "\n")
    if not path.is_file():
        pytest.fail(f"no golden file {path}: record it with RAYSWEEP_RECORD_GOLDEN=1")
    return json.loads(path.read_text())


def compare_tables(got_dir: Path, name: str, tables: list[str]) -> None:
    """Each table of `got_dir` equals its recording under golden/<name>/ (sorted, volatile columns out)."""
    want_dir = GOLDEN / name
    for table in tables:
        got = pl.read_parquet(got_dir / f"{table}.parquet")
        got = got.drop([c for c in got.columns if c in VOLATILE])
        keys = [c for c in got.columns if got.schema[c] in (pl.String, pl.Int64, pl.Int32, pl.Boolean)]
        got = got.sort(keys) if keys else got
        path = want_dir / f"{table}.parquet"
        if RECORD:
            want_dir.mkdir(parents=True, exist_ok=True)
            got.write_parquet(path)
        if not path.is_file():
            pytest.fail(f"no golden table {path}: record it with RAYSWEEP_RECORD_GOLDEN=1")
        assert_frame_equal(got, pl.read_parquet(path), check_exact=False, rtol=1e-6, atol=1e-9)


def test_trial_ids_of_every_experiment_file(tmp_path, monkeypatch):
    """The ids of every file's trials. From an empty directory: files the grid names relative to
    it (vectors a run writes under runs/) are absent here as on a fresh clone."""
    from raysweep.sweep.expand import expand

    monkeypatch.chdir(tmp_path)
    ids = {name: sorted(t.id for t in expand(load_config(name))) for name in available_experiments()}
    assert ids == _recorded("trial_ids.json", ids)


def test_demo_design_tables_on_the_tiny_model(ray_local, tmp_path, monkeypatch):
    from raysweep.sweep.run import main

    monkeypatch.chdir(REPO)
    assert main(["exp=demo", f"storage={tmp_path}", *TINY]) == 0
    compare_tables(tmp_path / "demo", "demo_tiny",
                   ["trials", "losses", "completions", "scores", "heldout_logprob", "summary"])


@pytest.mark.integration  # the logprob pass loads the tiny model in-process
def test_heuristics_tables_of_the_tiny_experiment(tmp_path, monkeypatch):
    from raysweep.heuristics.__main__ import main

    monkeypatch.chdir(REPO)
    assert main(["exp=heuristics_playful_french", f"storage={tmp_path}", "model.name=tiny-random",
                 "heuristics.groups=[v4,v5]", "heuristics.n_train=2", "heuristics.n_control=2",
                 "heuristics.n_extra=2", "heuristics.cache=false"]) == 0
    compare_tables(tmp_path / "heuristics_playful_french", "heuristics_tiny",
                   ["logprobs", "token_logprobs", "selfperp", "heuristics", "angles", "prompts"])


def test_mech_tables_of_the_tiny_experiment(ray_local, tmp_path, monkeypatch):
    from raysweep.mech.__main__ import main

    monkeypatch.chdir(REPO)
    assert main(["exp=pps_vs_ip_tiny", f"storage={tmp_path}", "mech.n=2", "threads=1"]) == 0
    out = tmp_path / "pps_vs_ip_tiny" / "mech"
    written = sorted(p.stem for p in out.glob("*.parquet"))
    assert RECORD or written == sorted(p.stem for p in (GOLDEN / "mech_tiny").glob("*.parquet"))
    compare_tables(out, "mech_tiny", written)
