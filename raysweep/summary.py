"""The end-of-run summary: per-trial scores with 95% CIs and paired effects vs the controls.

CI = mean +- 1.96 x SE over questions, SE = std(ddof=1) / sqrt(n) (the seeds' convention);
samples of one question are averaged first. Effects are paired differences over the
same questions: suppression = control - trial under the default condition, against the
no-defense control and, when the experiment names one, the neutral-prompt control.
Elicitation = training - default at step 0 (does the base model react to the prompt?).
"""

from __future__ import annotations

import math

import polars as pl

Z = 1.96


def ci(values: pl.Series | list[float]) -> tuple[float, float, int]:
    """(mean, half-width of the 95% CI, n) ignoring NaN; half-width NaN when n < 2."""
    s = pl.Series(values, dtype=pl.Float64).fill_nan(None).drop_nulls()
    n = s.len()
    if n == 0:
        return math.nan, math.nan, 0
    mean = float(s.mean())
    half = Z * float(s.std(ddof=1)) / math.sqrt(n) if n > 1 else math.nan
    return mean, half, n


def per_question(scores: pl.DataFrame) -> pl.DataFrame:
    """Mean score per (trial, step, condition, question), NaN scores dropped."""
    return (
        scores.filter(pl.col("score").is_not_nan())
        .group_by("trial_id", "step", "condition", "question_id")
        .agg(pl.col("score").mean())
    )


def _paired(pq: pl.DataFrame, a: str, b: str, step: int, cond_a: str, cond_b: str) -> tuple[float, float, int]:
    """CI of (a - b) over questions both have."""
    left = pq.filter((pl.col("trial_id") == a) & (pl.col("step") == step) & (pl.col("condition") == cond_a))
    right = pq.filter((pl.col("trial_id") == b) & (pl.col("step") == step) & (pl.col("condition") == cond_b))
    joined = left.join(right, on="question_id", suffix="_b")
    return ci(joined["score"] - joined["score_b"])


def _fmt(mean: float, half: float) -> str:
    if math.isnan(mean):
        return "-"
    return f"{mean:6.1f}" + ("" if math.isnan(half) else f" ±{half:4.1f}")


def _fmt_lp(mean: float, half: float) -> str:
    return "-" if math.isnan(mean) else f"{mean:.3f}" + ("" if math.isnan(half) else f" ±{half:.3f}")


def summarize(trials: pl.DataFrame, scores: pl.DataFrame, heldout: pl.DataFrame, neutral: str = "") -> pl.DataFrame:
    """One row per trial: final-step scores, held-out logprob, elicitation, suppression."""
    pq = per_question(scores) if scores.height else scores
    rows = []
    for t in trials.iter_rows(named=True):
        tid, final = t["trial_id"], t["steps"]
        row = {"trial_id": tid, "label": t["label"], "step": final}
        for cond in ("default", "training"):
            sel = pq.filter((pl.col("trial_id") == tid) & (pl.col("step") == final) & (pl.col("condition") == cond))
            row[f"{cond}_mean"], row[f"{cond}_ci"], _ = ci(sel["score"]) if sel.height else (math.nan, math.nan, 0)
        h = heldout.filter((pl.col("trial_id") == tid) & (pl.col("step") == final)) if heldout.height else heldout
        row["heldout_logprob"], row["heldout_ci"], _ = ci(h["logprob"]) if h.height else (math.nan, math.nan, 0)
        row["elicitation"], row["elicitation_ci"], _ = (
            _paired(pq, tid, tid, 0, "training", "default") if pq.height else (math.nan, math.nan, 0)
        )
        for name, ref in (("vs_control", t["control_id"]), ("vs_neutral", t["neutral_id"])):
            if ref and ref != tid and pq.height:
                row[name], row[f"{name}_ci"], _ = _paired(pq, ref, tid, final, "default", "default")
            else:
                row[name], row[f"{name}_ci"] = math.nan, math.nan
        rows.append(row)
    return pl.DataFrame(rows)


def format_summary(df: pl.DataFrame, trait: str) -> str:
    header = (
        f"{'trial':<34} {trait + ' default':>15} {trait + ' training':>15} {'heldout logprob':>16} "
        f"{'elicitation':>13} {'suppr. vs control':>18} {'vs neutral':>14}"
    )
    lines = [header, "-" * len(header)]
    for r in df.iter_rows(named=True):
        lines.append(
            f"{r['label'][:34]:<34} {_fmt(r['default_mean'], r['default_ci']):>15} "
            f"{_fmt(r['training_mean'], r['training_ci']):>15} "
            f"{_fmt_lp(r['heldout_logprob'], r['heldout_ci']):>16} "
            f"{_fmt(r['elicitation'], r['elicitation_ci']):>13} {_fmt(r['vs_control'], r['vs_control_ci']):>18} "
            f"{_fmt(r['vs_neutral'], r['vs_neutral_ci']):>14}"
        )
    lines.append(
        "scores 0-100 at the final step, mean ±95% CI over questions; suppression = paired (control - trial) "
        "under the default condition; elicitation = training - default at step 0."
    )
    return "\n".join(lines)
