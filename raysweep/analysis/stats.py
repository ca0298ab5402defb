"""The statistics kernel: per-question means keyed on trait, 95% CIs, paired differences.

Every score is first averaged over the samples of one question, then summarised over
questions as mean +- 1.96 x SE, SE = std(ddof=1) / sqrt(n) (the seeds' convention; the
half-width is null when n < 2). Effects are paired over the questions both sides have:
suppression = control - trial, elicitation = training - default at step 0, fixed-vs-mix
gap = fixed - mix. Unscorable scores (NaN) are dropped before anything is averaged.
`queries.py` builds the other queries (loading, summary, EM, fits, seeds) on these.

Functions take DataFrames or LazyFrames (e.g. `scan(...)` over several experiments) and
return DataFrames. When the frames carry an `experiment` column (as `scan` adds), every
grouping and join also keys on it, so one query covers several experiments at once.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence

import polars as pl

Z = 1.96  # normal quantile of the two-sided 95% CI (the seeds' convention)

Frame = pl.DataFrame | pl.LazyFrame
TRIAL_COLUMNS = ("label", "defense", "prompt", "mode", "placement")

# --- building blocks -----------------------------------------------------------------


def _lazy(df: Frame) -> pl.LazyFrame:
    return df.lazy()


def _names(df: Frame) -> list[str]:
    return df.collect_schema().names()


def _exp(*frames: Frame) -> list[str]:
    """["experiment"] when every frame has that column, else []."""
    return ["experiment"] if all("experiment" in _names(f) for f in frames) else []


def ci_agg(x: str | pl.Expr = "score") -> list[pl.Expr]:
    """Aggregations `mean`, `ci` (half-width of the 95% CI) and `n` of a column or expression, NaN dropped."""
    x = (pl.col(x) if isinstance(x, str) else x).fill_nan(None)
    n = x.count()
    return [x.mean().alias("mean"), (Z * x.std(ddof=1) / n.sqrt()).alias("ci"), n.alias("n")]


def with_bounds(df: pl.DataFrame, mean: str = "mean", ci: str = "ci") -> pl.DataFrame:
    """Add `lo` and `hi` = mean -+ ci (null where the CI is)."""
    return df.with_columns(lo=pl.col(mean) - pl.col(ci), hi=pl.col(mean) + pl.col(ci))


def ci(values: Sequence[float] | pl.Series) -> tuple[float, float, int]:
    """(mean, half-width of the 95% CI, n) of plain values by `ci_agg`; NaN where `ci_agg` gives null."""
    row = pl.DataFrame({"x": pl.Series(values, dtype=pl.Float64)}).select(ci_agg("x")).row(0)
    return (math.nan if row[0] is None else row[0]), (math.nan if row[1] is None else row[1]), row[2]


def question_means(scores: Frame) -> pl.LazyFrame:
    """Mean score per (trial, step, condition, trait, question) over its samples, NaN dropped."""
    keys = _exp(scores) + ["trial_id", "step", "condition", "trait", "question_id"]
    return (
        _lazy(scores)
        .filter(pl.col("score").is_not_nan() & pl.col("score").is_not_null())
        .group_by(keys)
        .agg(pl.col("score").mean())
    )


def with_trials(df: Frame, trials: Frame | None, columns: Sequence[str] = TRIAL_COLUMNS) -> pl.DataFrame:
    """Join the trials' label, defense, prompt, mode and placement onto rows keyed by trial_id."""
    out = _lazy(df)
    if trials is not None:
        cols = [c for c in columns if c in _names(trials) and c not in _names(df)]
        on = _exp(df, trials) + ["trial_id"]
        out = out.join(_lazy(trials).select(on + cols), on=on, how="left", maintain_order="left")
    return out.collect()


def at_final_step(df: Frame) -> pl.DataFrame:
    """Rows at each trial's last step present in `df`."""
    trial = _exp(df) + ["trial_id"]
    return _lazy(df).filter(pl.col("step") == pl.col("step").max().over(trial)).collect()


# --- per-trial scores ----------------------------------------------------------------


def trait_scores(scores: Frame, trials: Frame | None = None) -> pl.DataFrame:
    """Per (trial, step, condition, trait): mean, ci, n over questions; lo/hi; trial columns."""
    keys = _exp(scores) + ["trial_id", "step", "condition", "trait"]
    df = question_means(scores).group_by(keys).agg(ci_agg("score")).sort(keys)
    return with_bounds(with_trials(df, trials))


def gate_strength(scores: Frame, trials: Frame | None = None, condition: str = "training") -> pl.DataFrame:
    """The trait score under the training condition at each trial's final step (the gate)."""
    s = trait_scores(_lazy(scores).filter(pl.col("condition") == condition), trials)
    return at_final_step(s)


def heldout_curve(heldout: Frame, trials: Frame | None = None) -> pl.DataFrame:
    """Per (trial, step): mean per-token logprob of the held-out trait answers, ci, n over examples."""
    keys = _exp(heldout) + ["trial_id", "step"]
    df = _lazy(heldout).group_by(keys).agg(ci_agg("logprob")).sort(keys)
    return with_bounds(with_trials(df, trials))


# --- paired effects ------------------------------------------------------------------


def condition_diff(scores: Frame, a: str = "training", b: str = "default", trials: Frame | None = None) -> pl.DataFrame:
    """Paired (a - b) between two conditions of the same trial and step, over shared questions."""
    pq = question_means(scores)
    keys = _exp(scores) + ["trial_id", "step", "trait"]
    left = pq.filter(pl.col("condition") == a).drop("condition")
    right = pq.filter(pl.col("condition") == b).drop("condition").rename({"score": "score_b"})
    df = (
        left.join(right, on=keys + ["question_id"])
        .group_by(keys)
        .agg(ci_agg(pl.col("score") - pl.col("score_b")))
        .sort(keys)
    )
    return with_bounds(with_trials(df, trials))


def elicitation(scores: Frame, trials: Frame | None = None, step: int = 0) -> pl.DataFrame:
    """Training - default at `step` (0 = the base model): does the prompt elicit the trait?"""
    return condition_diff(_lazy(scores).filter(pl.col("step") == step), "training", "default", trials)


def suppression(
    scores: Frame, trials: Frame, against: str = "control", condition: str = "default"
) -> pl.DataFrame:
    """Paired (reference - trial) at each step over shared questions: positive = the defense suppresses.

    `against` = "control" (the no-defense trial at the same grid point, trials.control_id)
    or "neutral" (the neutral-prompt trial of the same mode, trials.neutral_id). A trial
    is never compared with itself; trials without a reference are left out.
    """
    ref_col = {"control": "control_id", "neutral": "neutral_id"}[against]
    exp = _exp(scores, trials)
    pairs = (
        _lazy(trials)
        .select(exp + ["trial_id", pl.col(ref_col).alias("ref_id")])
        .filter(pl.col("ref_id").is_not_null() & (pl.col("ref_id") != "") & (pl.col("ref_id") != pl.col("trial_id")))
    )
    pq = question_means(scores).filter(pl.col("condition") == condition)
    if not exp and "experiment" in _names(pq):
        pq = pq.drop("experiment")
    ref = pq.rename({"trial_id": "ref_id", "score": "ref_score"})
    keys = exp + ["trial_id", "ref_id", "step", "trait"]
    df = (
        pq.join(pairs, on=exp + ["trial_id"])
        .join(ref, on=exp + ["ref_id", "step", "condition", "trait", "question_id"])
        .group_by(keys)
        .agg(ci_agg(pl.col("ref_score") - pl.col("score")))
        .with_columns(against=pl.lit(against))
        .sort(keys)
    )
    return with_bounds(with_trials(df, trials))


def _without(axes_json: str, key: str) -> str:
    axes = json.loads(axes_json) if axes_json else {}
    axes.pop(key, None)
    return json.dumps(axes, sort_keys=True, default=str)


def fixed_mix_pairs(trials: Frame) -> pl.DataFrame:
    """IP trials that differ only in mode: one row (fixed_id, mix_id, prompt) per pair."""
    t = _lazy(trials).filter((pl.col("defense") == "ip") & pl.col("mode").is_in(["fixed", "mix"])).collect()
    exp = _exp(t)
    t = t.with_columns(pair=pl.col("axes").map_elements(lambda a: _without(a, "defense.ip.mode"), return_dtype=pl.String))
    fixed = t.filter(pl.col("mode") == "fixed").select(exp + ["pair", "prompt", "placement", pl.col("trial_id").alias("fixed_id")])
    mix = t.filter(pl.col("mode") == "mix").select(exp + ["pair", pl.col("trial_id").alias("mix_id")])
    return fixed.join(mix, on=exp + ["pair"]).sort(exp + ["prompt", "pair"])


def fixed_vs_mix_gap(scores: Frame, trials: Frame, condition: str = "default") -> pl.DataFrame:
    """Paired (fixed - mix) score per prompt and step over shared questions (the seeds' Exp 20 row 1).

    Negative = the fixed prefix leaves less of the trait than the rephrasing pool does.
    """
    pairs = fixed_mix_pairs(trials).lazy()
    exp = _exp(scores, pairs)
    pq = question_means(scores).filter(pl.col("condition") == condition).drop("condition")
    if not exp and "experiment" in _names(pq):
        pq = pq.drop("experiment")
    fixed = pq.rename({"trial_id": "fixed_id", "score": "fixed"})
    mix = pq.rename({"trial_id": "mix_id", "score": "mix"})
    keys = exp + ["prompt", "placement", "pair", "fixed_id", "mix_id", "step", "trait"]
    return with_bounds(
        pairs.join(fixed, on=exp + ["fixed_id"])
        .join(mix, on=exp + ["mix_id", "step", "trait", "question_id"])
        .group_by(keys)
        .agg(ci_agg(pl.col("fixed") - pl.col("mix")))
        .sort(keys)
        .collect()
    )
