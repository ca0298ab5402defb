"""Seed 001 Fig. 2: trials that start from a pre-finetuned model (`model.start`).

The starting models of `starts` are pre-finetuned once, in the same run, before the trials
that use them; each trial merges its start's adapter into the base before its own LoRA,
so its step 0 is the starting model. Also: an adapter directory as start, the config
errors, and the behaviour-matrix analysis on hand-made tables."""

import json
import math
from dataclasses import replace
from pathlib import Path

import polars as pl
import pytest

from raysweep.analysis import behaviour_matrix
from raysweep.config import ConfigError, load_config, trial_id
from raysweep.sweep.run import main
from raysweep.sweep.expand import check_inputs, expand, start_trial
from raysweep.train.trial import run_trial

REPO = Path(__file__).resolve().parents[1]
EXP = "pps_vs_ip_behaviour_tiny"
ONE_POST = "sweep.grid.data.train=[datasets/french_demo/train.jsonl]"


def load(*overrides: str):
    return load_config(EXP, list(overrides), directory=REPO / "experiments")


# ---------------------------------------------------------------------------------------------
# Config


def test_starts_expand_to_one_pre_finetuning_trial_each():
    trials = expand(load())
    assert len(trials) == 30  # 3 starts x 2 post-finetuning data x 5 methods
    starts = {start_trial(t.config).id: start_trial(t.config) for t in trials if t.config.model.start}
    assert sorted(s.label for s in starts.values()) == ["start:heavy", "start:medium"]
    for s in starts.values():
        c = s.config
        assert c.defense.kind == "none" and c.model.start == "" and c.starts == {}
        assert c.train.lr == 5e-3 and c.train.checkpoints == "final"
    heavy = next(s for s in starts.values() if s.label == "start:heavy")
    assert (heavy.config.data.train, heavy.config.train.max_steps) == ("datasets/french_demo/train.jsonl", 4)
    # A trial's identity holds its own start's recipe only; another start's recipe does not change it.
    t = next(t for t in trials if t.config.model.start == "heavy")
    assert list(t.config.starts) == ["heavy"]
    other = expand(load("starts.medium.max_steps=3"))
    assert t.id in {o.id for o in other}
    assert start_trial(t.config).id not in {start_trial(o.config).id for o in expand(load("starts.heavy.max_steps=3"))
                                            if o.config.model.start == "heavy"}


@pytest.mark.parametrize("override,message", [
    ("sweep.grid.model.start=[nowhere]", "model.start='nowhere' is neither a key of `starts` (known: heavy, medium)"),
    ("eval.backend=vllm", "needs eval.backend=transformers"),
])
def test_bad_start_fails_naming_the_key(override, message):
    if override == "eval.backend=vllm":
        pytest.importorskip("vllm")
    with pytest.raises(ConfigError) as err:
        expand(load(override))
    assert message in str(err.value)


def test_missing_start_data_names_the_key():
    with pytest.raises(ConfigError, match=r"starts\.heavy\.train: .*nope\.jsonl"):
        check_inputs(expand(load("starts.heavy.train=datasets/nope.jsonl")))


def test_cli_exits_2_on_an_unknown_start(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    assert main([f"exp={EXP}", f"storage={tmp_path}", "sweep.grid.model.start=[ghost]"]) == 2
    assert "model.start='ghost'" in capsys.readouterr().err
    assert not (tmp_path / EXP).exists()


# ---------------------------------------------------------------------------------------------
# End to end (tiny random model, real local Ray)


@pytest.fixture(scope="module")
def behaviour_run(tmp_path_factory, ray_local):
    import os
    import subprocess
    import sys

    root = tmp_path_factory.mktemp("behaviour")
    vectors = subprocess.run(
        [sys.executable, "-m", "raysweep.mech", "exp=pps_vs_ip_tiny", f"storage={root}", "mech.n=2", "threads=1",
         "mech.analyses=[vectors,prompt_diff]"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert vectors.returncode == 0, vectors.stderr[-3000:]
    cwd = os.getcwd()
    os.chdir(REPO)
    try:
        assert main([f"exp={EXP}", f"storage={root}", ONE_POST]) == 0
    finally:
        os.chdir(cwd)
    return root / EXP


def _heldout(exp: Path, tid: str, step: int) -> list[float]:
    h = pl.read_parquet(exp / "trials" / tid / "eval" / f"step_{step}.heldout_logprob.parquet")
    return h.sort("example_id")["logprob"].to_list()


def test_trials_start_from_their_pre_finetuned_model(behaviour_run):
    exp = behaviour_run
    trials = pl.read_parquet(exp / "trials.parquet")
    assert len(trials) == 15 and set(trials["status"]) == {"done"}
    assert set(trials["start"]) == {"", "medium", "heavy"}
    start_ids = {s: i for s, i in zip(trials["start"], trials["start_id"])}
    assert start_ids[""] == "" and start_ids["medium"] != start_ids["heavy"]
    for start in ("medium", "heavy"):  # pre-finetuned once, for all five methods that start from it
        sid = start_ids[start]
        attempts = list((exp / "trials" / sid / "attempts").glob("*.json"))
        assert len(attempts) == 1
        done = json.loads((exp / "trials" / sid / "done.json").read_text())
        assert done["steps"] == {"medium": 2, "heavy": 4}[start]
        end_of_start = _heldout(exp, sid, done["steps"])
        for tid in trials.filter(pl.col("start") == start)["trial_id"]:
            # Step 0 of the trial is the starting model: its held-out logprobs are the start's final ones.
            assert _heldout(exp, tid, 0) == pytest.approx(end_of_start, abs=1e-5)
    base = trials.filter(pl.col("start") == "")["trial_id"][0]
    heavy = trials.filter(pl.col("start") == "heavy")["trial_id"][0]
    moved = [abs(a - b) for a, b in zip(_heldout(exp, base, 0), _heldout(exp, heavy, 0))]
    assert max(moved) > 1e-3  # pre-finetuning changed the model


def test_rerun_trains_nothing(behaviour_run, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    root = behaviour_run.parent
    assert main([f"exp={EXP}", f"storage={root}", ONE_POST]) == 0
    out = capsys.readouterr().out
    assert "2 pre-finetuned starting models, 0 to train" in out and "15 finished, 0 to run" in out


def test_behaviour_matrix_and_report_from_the_run(behaviour_run):
    from raysweep.report.page import build_report

    exp = behaviour_run
    trials = pl.read_parquet(exp / "trials.parquet")
    m = behaviour_matrix(pl.read_parquet(exp / "scores.parquet"), trials)
    assert len(m) == 15 and set(m["post"]) == {"train"}
    assert set(m["method"]) == {"control", "answer_french/fixed", "be_flattering/fixed", "pps:french@L1x4",
                                "pps:french_random@L1x4"}
    assert m.filter(pl.col("method") == "control")["vs_none"].is_null().all()
    assert m.filter(pl.col("method") != "control")["vs_none"].is_not_null().all()
    index, failures = build_report(exp)
    assert failures == []
    for name in ("behaviour_matrix", "behaviour_vs_none"):
        assert (exp / "report" / f"{name}.png").stat().st_size > 1000


def test_an_adapter_directory_as_start(behaviour_run, tmp_path, monkeypatch):
    """model.start = a PEFT adapter directory: the same starting model as the named start, and
    the adapter's content is part of the trial's identity."""
    monkeypatch.chdir(REPO)
    exp = behaviour_run
    trials = pl.read_parquet(exp / "trials.parquet")
    heavy_sid = trials.filter(pl.col("start") == "heavy")["start_id"][0]
    adapter = exp / "adapters" / heavy_sid / "step_4"
    cfg = next(t.config for t in expand(load(ONE_POST)) if t.config.model.start == "heavy"
               and t.config.defense.kind == "none")
    by_path = replace(cfg, model=replace(cfg.model, start=str(adapter)), starts={})
    run_trial(by_path, tmp_path, "bypath")
    assert _heldout(tmp_path, "bypath", 0) == pytest.approx(_heldout(exp, heavy_sid, 4), abs=1e-5)
    copy = tmp_path / "copy"
    copy.mkdir()
    for f in adapter.iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    moved = replace(by_path, model=replace(cfg.model, start=str(copy)))
    assert trial_id(moved) != trial_id(by_path)  # another path
    first = trial_id(moved)
    (copy / "adapter_config.json").write_text((copy / "adapter_config.json").read_text() + "\n")
    assert trial_id(moved) != first  # same path, new content


# ---------------------------------------------------------------------------------------------
# behaviour_matrix on hand-made tables


def test_behaviour_matrix_exact():
    def trial(tid, label, defense, start, control):
        return {"trial_id": tid, "label": label, "defense": defense, "start": start, "control_id": control,
                "axes": json.dumps({"model.start": start, "data.train": "d/heavy.jsonl"})}

    trials = pl.DataFrame([trial("c0", "control[start=base,train=heavy]", "none", "", "c0"),
                           trial("i0", "ip/fixed[start=base,train=heavy]", "ip", "", "c0"),
                           trial("c1", "control[start=med,train=heavy]", "none", "med", "c1"),
                           trial("i1", "ip/fixed[start=med,train=heavy]", "ip", "med", "c1")])
    rows = []
    # score[trial][step] per question (2 questions, 2 samples each: the sample mean is the question's score)
    table = {"c0": {0: [10, 20], 5: [80, 60]}, "i0": {0: [10, 20], 5: [30, 40]},
             "c1": {0: [50, 50], 5: [90, 70]}, "i1": {0: [50, 50], 5: [20, 10]}}
    for tid, steps in table.items():
        for step, qs in steps.items():
            for q, v in enumerate(qs):
                for s, d in enumerate((-1.0, 1.0)):
                    rows.append({"trial_id": tid, "step": step, "condition": "default", "trait": "evil",
                                 "question_id": q, "sample": s, "score": v + d})
    rows.append({"trial_id": "i1", "step": 5, "condition": "default", "trait": "evil", "question_id": 1,
                 "sample": 2, "score": math.nan})  # unscorable: dropped
    m = behaviour_matrix(pl.DataFrame(rows), trials)
    got = {r["trial_id"]: r for r in m.iter_rows(named=True)}
    assert got["i0"]["mean"] == 35 and got["i0"]["start_mean"] == 15 and got["i0"]["post"] == "heavy"
    assert got["i0"]["vs_none"] == pytest.approx(((30 - 80) + (40 - 60)) / 2)  # -35
    assert got["i1"]["vs_none"] == pytest.approx(((20 - 90) + (10 - 70)) / 2)  # -65
    assert got["i1"]["start"] == "med" and got["i1"]["start_mean"] == 50 and got["i1"]["method"] == "ip/fixed"
    # 95% CI of the paired differences (-50, -20) and (-70, -60): 1.96 * std(ddof=1) / sqrt(2)
    assert got["i0"]["vs_none_ci"] == pytest.approx(1.96 * 15 * 2 ** 0.5 / 2 ** 0.5)
    assert got["c0"]["vs_none"] is None and got["c0"]["mean"] == 70
