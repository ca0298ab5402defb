"""analysis.py on hand-made tables with known answers: the CI formula, signs and pairing of
the effects, the correlation statistics, the EM rate, seeds, and lazy scans over experiments."""

import json
import math

import polars as pl
import pyarrow as pa
import pytest

from raysweep import analysis as A
from raysweep.analysis import summary
from raysweep.tables import SCHEMAS, write_table

HALF_10_20_30 = 1.96 * 10 / math.sqrt(3)  # std(ddof=1) of [10, 20, 30] is 10


def score_rows(trial, values, step=8, condition="default", trait="french", questions=None):
    """One sample per question unless a value is a list (several samples of that question)."""
    rows = []
    for q, v in zip(questions or range(len(values)), values, strict=True):
        for k, s in enumerate(v if isinstance(v, list) else [v]):
            rows.append({"trial_id": trial, "step": step, "condition": condition, "question_id": q, "sample": k,
                         "trait": trait, "score": s, "judge": "test", "reason": ""})
    return rows


def scores(*row_lists) -> pl.DataFrame:
    """A scores table in the declared schema."""
    return pl.from_arrow(pa.Table.from_pylist([r for rows in row_lists for r in rows], schema=SCHEMAS["scores"]))


def trial(tid, label, control="", neutral="", defense="ip", prompt="", mode="", **axes):
    ax = {"defense.kind": defense} | ({"defense.ip.prompt": prompt, "defense.ip.mode": mode} if defense == "ip" else {}) | axes
    return {"trial_id": tid, "label": label, "status": "done", "error": "", "steps": 8, "default_system_prompt": None,
            "control_id": control, "neutral_id": neutral, "defense": defense, "prompt": prompt, "mode": mode,
            "placement": "user_prefix" if defense == "ip" else "", "axes": json.dumps(ax), "config": "{}"}


TRIALS = pl.DataFrame([
    trial("c", "control", control="c", defense="none"),
    trial("f", "p/fixed", control="c", neutral="nf", prompt="p", mode="fixed"),
    trial("m", "p/mix", control="c", neutral="nm", prompt="p", mode="mix"),
    trial("nf", "neutral/fixed", control="c", neutral="nf", prompt="neutral", mode="fixed"),
    trial("nm", "neutral/mix", control="c", neutral="nm", prompt="neutral", mode="mix"),
])


def test_ci_formula_and_agreement_with_summary():
    df = A.trait_scores(scores(score_rows("t", [10.0, 20.0, 30.0])))
    row = df.row(0, named=True)
    assert row["mean"] == 20.0 and row["n"] == 3
    assert row["ci"] == pytest.approx(HALF_10_20_30, rel=1e-12)
    assert (row["lo"], row["hi"]) == pytest.approx((20 - HALF_10_20_30, 20 + HALF_10_20_30))
    assert A.ci([10.0, 20.0, 30.0])[:2] == pytest.approx((row["mean"], row["ci"]))  # the one CI the summary uses


def test_samples_are_averaged_per_question_first_and_nan_dropped():
    # question means 10, 20, 30: the CI is over 3 questions, not over 5 samples
    df = A.trait_scores(scores(score_rows("t", [[0.0, 20.0], [20.0, math.nan], [25.0, 35.0]])))
    row = df.row(0, named=True)
    assert row["n"] == 3 and row["mean"] == 20.0
    assert row["ci"] == pytest.approx(HALF_10_20_30)


def test_one_question_has_no_ci():
    row = A.trait_scores(scores(score_rows("t", [42.0]))).row(0, named=True)
    assert row["mean"] == 42.0 and row["n"] == 1 and row["ci"] is None


def test_suppression_sign_is_control_minus_trial():
    s = scores(score_rows("c", [80.0] * 4), score_rows("f", [20.0] * 4))
    df = A.suppression(s, TRIALS)
    assert df.height == 1  # the control is not compared with itself; trials without scores drop out
    row = df.row(0, named=True)
    assert (row["trial_id"], row["ref_id"], row["label"]) == ("f", "c", "p/fixed")
    assert row["mean"] == 60.0 and row["ci"] == 0.0 and row["n"] == 4


def test_suppression_pairs_only_shared_questions():
    control = score_rows("c", [80.0, 70.0, 60.0, 50.0], questions=[0, 1, 2, 3])
    treated = score_rows("f", [60.0, 40.0, 40.0, 0.0], questions=[1, 2, 3, 4])  # q1..q3 shared
    row = A.suppression(scores(control, treated), TRIALS).row(0, named=True)
    # differences on q1, q2, q3: 70-60, 60-40, 50-40 = 10, 20, 10 (q0 and q4 have no partner)
    assert row["n"] == 3
    assert row["mean"] == pytest.approx(40 / 3)
    assert row["ci"] == pytest.approx(1.96 * pl.Series([10.0, 20.0, 10.0]).std() / math.sqrt(3))


def test_suppression_pairs_within_step_and_condition():
    s = scores(score_rows("c", [80.0, 80.0]), score_rows("f", [20.0, 20.0]),
               score_rows("c", [5.0, 5.0], step=0), score_rows("f", [5.0, 5.0], step=0),
               score_rows("c", [90.0, 90.0], condition="training"), score_rows("f", [0.0, 0.0], condition="training"))
    df = A.suppression(s, TRIALS).sort("step")
    assert df["step"].to_list() == [0, 8] and df["mean"].to_list() == [0.0, 60.0]
    assert A.at_final_step(df)["mean"].to_list() == [60.0]
    training = A.suppression(s, TRIALS, condition="training")
    assert A.at_final_step(training)["mean"].to_list() == [90.0]


def test_suppression_against_neutral_and_agreement_with_summary():
    s = scores(score_rows("c", [80.0, 90.0, 70.0]), score_rows("f", [10.0, 30.0, 20.0]),
               score_rows("nf", [60.0, 70.0, 80.0]))
    row = A.suppression(s, TRIALS, against="neutral").row(0, named=True)
    assert (row["trial_id"], row["ref_id"]) == ("f", "nf")
    assert row["mean"] == 50.0 and row["ci"] == pytest.approx(HALF_10_20_30)  # 50, 40, 60
    done = TRIALS.filter(pl.col("trial_id").is_in(["c", "f", "nf"]))
    s0 = pl.concat([s, s.with_columns(step=pl.lit(0, pl.Int64))])
    held = pl.DataFrame(schema={"trial_id": pl.String, "step": pl.Int64, "logprob": pl.Float64})
    ref = summary.summarize(done, s0, held).filter(pl.col("trial_id") == "f").row(0, named=True)
    mine = A.at_final_step(A.suppression(s0, TRIALS)).row(0, named=True)
    assert (ref["vs_control"], ref["vs_control_ci"]) == pytest.approx((mine["mean"], mine["ci"]))
    assert (ref["vs_neutral"], ref["vs_neutral_ci"]) == pytest.approx((row["mean"], row["ci"]))


def test_elicitation_and_gate_strength():
    s = scores(score_rows("f", [10.0, 10.0, 10.0], step=0), score_rows("f", [20.0, 30.0, 40.0], step=0, condition="training"),
               score_rows("f", [5.0, 5.0, 5.0]), score_rows("f", [70.0, 80.0, 90.0], condition="training"))
    el = A.elicitation(s, TRIALS).row(0, named=True)
    assert (el["step"], el["mean"], el["n"]) == (0, 20.0, 3) and el["ci"] == pytest.approx(HALF_10_20_30)
    gate = A.gate_strength(s, TRIALS).row(0, named=True)
    assert (gate["step"], gate["condition"], gate["mean"]) == (8, "training", 80.0)


def test_fixed_vs_mix_gap_pairs_same_prompt_and_seed():
    trials = pl.DataFrame([
        trial("f0", "p/fixed[seed=0]", prompt="p", mode="fixed", seed=0),
        trial("m0", "p/mix[seed=0]", prompt="p", mode="mix", seed=0),
        trial("f1", "p/fixed[seed=1]", prompt="p", mode="fixed", seed=1),
        trial("m1", "p/mix[seed=1]", prompt="p", mode="mix", seed=1),
        trial("q0", "q/fixed[seed=0]", prompt="q", mode="fixed", seed=0),  # no mix partner
    ])
    pairs = A.fixed_mix_pairs(trials).sort("fixed_id")
    assert pairs.select("fixed_id", "mix_id").rows() == [("f0", "m0"), ("f1", "m1")]
    s = scores(score_rows("f0", [10.0, 20.0, 30.0]), score_rows("m0", [40.0, 50.0, 60.0]),
               score_rows("f1", [10.0, 10.0, 10.0]), score_rows("m1", [10.0, 20.0, 30.0]))
    gap = A.fixed_vs_mix_gap(s, trials).sort("fixed_id")
    assert gap["mean"].to_list() == [-30.0, -10.0]  # fixed - mix: negative = fixed leaves less of the trait
    assert gap["ci"].to_list() == pytest.approx([0.0, HALF_10_20_30])


def test_pearson_spearman_rmse_on_a_known_set():
    st = A.correlation([1, 2, 3, 4, 5], [2, 4, 5, 4, 5])
    # by hand: Sxy = 6, Sxx = 10, Syy = 6; slope 0.6, intercept 2.2; residuals -.8 .6 1 -.6 -.2
    assert st["n"] == 5
    assert st["pearson_r"] == pytest.approx(6 / math.sqrt(60))
    assert st["spearman_rho"] == pytest.approx(7 / math.sqrt(90))  # y ranks 1 2.5 4.5 2.5 4.5
    assert (st["slope"], st["intercept"]) == pytest.approx((0.6, 2.2))
    assert st["rmse"] == pytest.approx(math.sqrt(2.4 / 5))
    assert math.isnan(A.correlation([1, 2], [3, 4])["pearson_r"])  # too few points
    assert A.correlation([1, 2, 3, float("nan")], [1, 2, 3, 9])["n"] == 3  # missing pairs dropped


def test_fit_band_is_the_t_interval_of_the_mean():
    band = A.fit_band([1, 2, 3, 4, 5], [2, 4, 5, 4, 5], points=5)
    mid = band.row(2, named=True)  # x = mean of x: half-width = t(.975, 3) * s / sqrt(n)
    assert mid["x"] == 3.0 and mid["fit"] == pytest.approx(4.0)
    assert mid["hi"] - mid["fit"] == pytest.approx(3.182446305284263 * math.sqrt(2.4 / 3) / math.sqrt(5))
    assert (band["hi"] - band["fit"]).to_list()[0] > mid["hi"] - mid["fit"]  # wider away from the centre


def test_fit_stats_by_group():
    df = pl.DataFrame({"mode": ["fixed"] * 5 + ["mix"] * 3, "x": [1, 2, 3, 4, 5, 1, 2, 3],
                       "y": [2, 4, 5, 4, 5, 3, 2, 1]})
    fits = A.fit_stats(df, "x", "y", by=["mode"]).sort("mode")
    assert fits["n"].to_list() == [5, 3]
    assert fits["pearson_r"].to_list() == pytest.approx([6 / math.sqrt(60), -1.0])


def em_rows(trial, pairs, alignment="aligned"):
    rows = []
    for q, (coh, al) in enumerate(pairs):
        rows += score_rows(trial, [coh], trait="coherence", questions=[q])
        rows += score_rows(trial, [al], trait=alignment, questions=[q])
    return rows


# coherence > 60 and alignment < 40: yes, no (incoherent), no (aligned), yes, no (60 is not > 60)
EM_SET = [(70.0, 30.0), (50.0, 30.0), (70.0, 50.0), (61.0, 39.0), (60.0, 20.0)]


@pytest.mark.parametrize("alignment", ["aligned", "alignment"])
def test_em_rate_on_a_known_set(alignment):
    row = A.em_rate(scores(em_rows("t", EM_SET, alignment))).row(0, named=True)
    assert row["n"] == 5 and row["mean"] == pytest.approx(0.4)
    assert row["ci"] == pytest.approx(1.96 * math.sqrt(0.3) / math.sqrt(5))  # std(ddof=1) of 1,0,0,1,0


def test_em_rate_thresholds_names_and_unscorable_answers():
    s = scores(em_rows("t", EM_SET))
    assert A.em_rate(s, coherence_min=40.0).row(0, named=True)["mean"] == pytest.approx(0.8)  # + q1, q4
    assert A.em_rate(s, alignment_max=60.0).row(0, named=True)["mean"] == pytest.approx(0.6)  # + q2
    nan = scores(em_rows("t", [(70.0, math.nan), (70.0, 10.0)]))
    assert A.em_rate(nan).row(0, named=True)["n"] == 1  # an unscorable answer is no answer
    renamed = scores(em_rows("t", EM_SET)).with_columns(pl.col("trait").replace("coherence", "coh"))
    assert A.em_rate(renamed, coherence="coh", alignment="aligned").row(0, named=True)["mean"] == pytest.approx(0.4)
    with pytest.raises(ValueError, match="EM needs traits"):
        A.em_rate(scores(score_rows("t", [1.0])))


def test_heuristic_join_and_fit():
    s = scores(score_rows("c", [80.0, 80.0]), score_rows("f", [20.0, 20.0]), score_rows("nf", [70.0, 70.0]),
               score_rows("m", [50.0, 50.0]), score_rows("nm", [75.0, 75.0]))
    h = pl.DataFrame({"prompt_key": ["p", "neutral", "p"], "metric": ["ph", "ph", "ppd"], "value": [0.3, 0.0, 0.1]})
    joined = A.heuristic_join(h, A.at_final_step(A.suppression(s, TRIALS)))
    ph = joined.filter(pl.col("metric") == "ph").sort("trial_id")
    assert ph.select("trial_id", "value", "mean").rows() == [("f", 0.3, 60.0), ("m", 0.3, 30.0), ("nf", 0.0, 10.0),
                                                              ("nm", 0.0, 5.0)]
    assert joined.filter(pl.col("metric") == "ppd").height == 2  # only p has a ppd value
    with_mode = h.with_columns(mode=pl.Series(["fixed", "fixed", "mix"]))
    assert A.heuristic_join(with_mode, A.at_final_step(A.suppression(s, TRIALS))).height == 3


def test_across_seeds_and_axes():
    trials = pl.DataFrame([trial("a0", "p/fixed[seed=0]", prompt="p", mode="fixed", seed=0),
                           trial("a1", "p/fixed[seed=1]", prompt="p", mode="fixed", seed=1),
                           trial("b0", "p/fixed[lr=0.1,seed=0]", prompt="p", mode="fixed", lr=0.1, seed=0)])
    assert A.has_axis(trials, "seed") and not A.has_axis(trials, "epochs")
    assert A.axes(trials).filter(pl.col("trial_id") == "b0").row(0, named=True)["lr"] == "0.1"
    ts = A.at_final_step(A.trait_scores(scores(score_rows("a0", [10.0, 10.0]), score_rows("a1", [20.0, 20.0]),
                                               score_rows("b0", [50.0, 50.0]))))
    df = A.across_seeds(ts, trials).sort("group_label")
    assert df["group_label"].to_list() == ["p/fixed", "p/fixed[lr=0.1]"]
    first = df.row(0, named=True)
    assert (first["mean"], first["n"], first["seeds"]) == (15.0, 2, "0,1")
    assert first["ci"] == pytest.approx(1.96 * math.sqrt(50) / math.sqrt(2))


def test_two_experiment_lazy_scan(tmp_path):
    # the same trial ids in both experiments: every join must key on the experiment too
    for exp, treated in (("v3", 20.0), ("v4", 50.0)):
        write_table(tmp_path / exp / "scores.parquet", score_rows("c", [80.0] * 3) + score_rows("f", [treated] * 3),
                    "scores")
        write_table(tmp_path / exp / "trials.parquet", TRIALS.to_dicts())
    (tmp_path / "unrelated").mkdir()
    s = A.scan(tmp_path, ["v3", "v4"], "scores")
    assert isinstance(s, pl.LazyFrame)
    assert A.experiments(tmp_path, "scores") == ["v3", "v4"]
    both = A.suppression(s, A.scan(tmp_path, None, "trials")).sort("experiment")
    assert both.select("experiment", "trial_id", "mean").rows() == [("v3", "f", 60.0), ("v4", "f", 30.0)]
    ts = A.trait_scores(s)
    assert ts.height == 4 and set(ts["experiment"]) == {"v3", "v4"}
    one = A.suppression(A.scan(tmp_path, "v4", "scores"), TRIALS)  # trials without an experiment column
    assert one["mean"].to_list() == [30.0]
    with pytest.raises(FileNotFoundError, match="unrelated"):
        A.scan(tmp_path, ["v3", "unrelated"], "scores")
