"""The end-of-run summary on hand-made two-trait score tables (no model, no Ray): one row per
(trial, trait), never the mean of several traits, and every number exactly the one analysis.py
computes (summary.py only formats), in summary.parquet, the printed table and the Tune metrics."""

import math

import polars as pl
import pytest
from test_analysis import HALF_10_20_30, TRIALS, score_rows, scores

from raysweep import analysis as A
from raysweep.analysis import summary

DONE = TRIALS.filter(pl.col("trial_id").is_in(["c", "f", "nf"]))


def two_traits() -> pl.DataFrame:
    rows = []
    for trait, table in {
        # (trial, step, condition) -> per-question values; alignment and coherence differ everywhere
        "alignment": {("c", 8, "default"): [80.0, 90.0, 70.0], ("f", 8, "default"): [10.0, 30.0, 20.0],
                      ("nf", 8, "default"): [60.0, 70.0, 80.0], ("f", 8, "training"): [5.0, 5.0, 5.0],
                      ("f", 0, "default"): [50.0, 50.0, 50.0], ("f", 0, "training"): [30.0, 40.0, 50.0],
                      ("c", 0, "default"): [1.0, 2.0, 3.0], ("c", 0, "training"): [1.0, 2.0, 3.0]},
        "coherence": {("c", 8, "default"): [20.0, 30.0, 40.0], ("f", 8, "default"): [[20.0, math.nan], 30.0, [30.0, 50.0]],
                      ("nf", 8, "default"): [90.0, 90.0, 90.0], ("f", 8, "training"): [95.0, 85.0, 90.0],
                      ("f", 0, "default"): [40.0, 40.0, 40.0], ("f", 0, "training"): [50.0, 50.0, 50.0],
                      ("c", 0, "default"): [7.0, 8.0, 9.0], ("c", 0, "training"): [9.0, 8.0, 7.0]},
    }.items():
        for (tid, step, cond), values in table.items():
            rows.append(score_rows(tid, values, step=step, condition=cond, trait=trait))
    return scores(*rows)


HELD = pl.DataFrame({"trial_id": ["c", "c", "f"], "step": [8, 8, 8], "logprob": [-1.0, -2.0, -0.5]})


def by_key(df: pl.DataFrame) -> dict:
    return {(r["trial_id"], r["trait"]): r for r in df.iter_rows(named=True)}


def test_summary_is_per_trait():
    df = summary.summarize(DONE, two_traits(), HELD, traits=["alignment", "coherence"])
    assert df.select("trial_id", "trait").rows() == [
        ("c", "alignment"), ("c", "coherence"), ("f", "alignment"), ("f", "coherence"),
        ("nf", "alignment"), ("nf", "coherence")]
    rows = by_key(df)
    f_al, f_co = rows["f", "alignment"], rows["f", "coherence"]
    assert (f_al["default_mean"], f_al["default_n"]) == (20.0, 3)
    assert f_al["default_ci"] == pytest.approx(HALF_10_20_30)
    # coherence: samples averaged per question first (20, 30, 40), NaN dropped
    assert (f_co["default_mean"], f_co["default_n"]) == (30.0, 3) and f_co["default_ci"] == pytest.approx(HALF_10_20_30)
    assert (f_al["training_mean"], f_al["training_ci"]) == (5.0, 0.0)
    assert f_co["training_mean"] == 90.0
    # elicitation (training - default at step 0): 30-50, 40-50, 50-50 -> -10; coherence 10
    assert f_al["elicitation"] == -10.0 and f_al["elicitation_ci"] == pytest.approx(HALF_10_20_30)
    assert (f_co["elicitation"], f_co["elicitation_ci"]) == (10.0, 0.0)
    # suppression vs control (c - f): 70, 60, 50 -> 60; coherence 0, 0, 0
    assert f_al["vs_control"] == 60.0 and f_al["vs_control_ci"] == pytest.approx(HALF_10_20_30)
    assert (f_co["vs_control"], f_co["vs_control_ci"]) == (0.0, 0.0)
    # vs neutral (nf - f): alignment 50, 40, 60 -> 50; coherence 70, 60, 50 -> 60
    assert f_al["vs_neutral"] == 50.0 and f_co["vs_neutral"] == 60.0
    # the held-out logprob is per trial: the same in each trait row
    assert f_al["heldout_logprob"] == f_co["heldout_logprob"] == -0.5
    assert rows["c", "alignment"]["heldout_logprob"] == -1.5
    assert math.isnan(rows["c", "alignment"]["vs_control"]) and math.isnan(rows["nf", "coherence"]["vs_neutral"])
    assert math.isnan(rows["nf", "alignment"]["heldout_logprob"]) and math.isnan(rows["nf", "alignment"]["elicitation"])


def test_summary_numbers_are_exactly_analysis():
    s = two_traits()
    rows = by_key(summary.summarize(DONE, s, HELD))
    ts = A.trait_scores(s, TRIALS).filter(pl.col("step") == 8)
    for r in ts.iter_rows(named=True):
        got = rows[r["trial_id"], r["trait"]]
        ci = math.nan if r["ci"] is None else r["ci"]
        assert got[f"{r['condition']}_mean"] == r["mean"] and got[f"{r['condition']}_n"] == r["n"]
        assert got[f"{r['condition']}_ci"] == ci or (math.isnan(ci) and math.isnan(got[f"{r['condition']}_ci"]))
    effects = [("elicitation", A.elicitation(s, TRIALS)),
               ("vs_control", A.at_final_step(A.suppression(s, TRIALS, "control"))),
               ("vs_neutral", A.at_final_step(A.suppression(s, TRIALS, "neutral")))]
    for name, df in effects:
        assert df.height
        for r in df.iter_rows(named=True):
            got = rows[r["trial_id"], r["trait"]]
            assert (got[name], got[f"{name}_ci"]) == (r["mean"], r["ci"])
    assert not hasattr(summary, "ci")  # one statistics module: the summary computes no CI of its own
    assert A.ci([10.0, 20.0, 30.0]) == (20.0, A.trait_scores(
        scores(score_rows("t", [10.0, 20.0, 30.0]))).item(0, "ci"), 3)


def test_printed_table_has_one_block_per_trait():
    df = summary.summarize(DONE, two_traits(), HELD, traits=["coherence", "alignment"])
    assert df["trait"].to_list()[:2] == ["coherence", "alignment"]  # the order asked for
    out = summary.format_summary(df, "coherence")
    lines = out.splitlines()
    heads = [i for i, line in enumerate(lines) if line.startswith("trial ")]
    assert len(heads) == 2
    assert "coherence default" in lines[heads[0]] and "alignment default" in lines[heads[1]]
    f_al = next(line for line in lines[heads[1]:] if line.startswith("p/fixed"))
    f_co = next(line for line in lines[heads[0]:heads[1]] if line.startswith("p/fixed"))
    assert f_al.split()[1] == "20.0" and f_co.split()[1] == "30.0"  # not their mean, 25.0
    assert "  60.0" in f_al and "   0.0" in f_co  # vs control


def test_single_trait_summary_keeps_its_columns():
    s = two_traits().filter(pl.col("trait") == "alignment")
    df = summary.summarize(DONE, s, HELD, traits=["alignment"])
    assert df.height == 3 and set(df["trait"]) == {"alignment"}
    assert {"trial_id", "label", "default_mean", "training_mean", "elicitation", "elicitation_ci", "vs_control",
            "vs_control_ci", "vs_neutral", "vs_neutral_ci", "heldout_logprob"} <= set(df.columns)
    assert "alignment default" in summary.format_summary(df, "alignment").splitlines()[0]


def test_tune_metrics_are_per_trait():
    s = two_traits().filter((pl.col("trial_id") == "f") & (pl.col("step") == 8))
    m = A.step_metrics(s, HELD.filter(pl.col("trial_id") == "f"), "alignment", ["default", "training"])
    assert m == {"trait_default/alignment": 20.0, "trait_default/coherence": 30.0,
                 "trait_training/alignment": 5.0, "trait_training/coherence": 90.0,
                 "trait_default": 20.0, "trait_training": 5.0, "heldout_logprob": -0.5}
    assert A.step_metrics(s, None, "alignment", ["default"]).keys() == {"trait_default/alignment",
                                                                       "trait_default/coherence", "trait_default"}
