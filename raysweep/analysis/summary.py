"""The end-of-run summary: the printed table of `analysis.summary_table`.

The numbers (per-trait scores with 95% CIs, elicitation, paired suppression vs the
controls) are computed once, in `raysweep.analysis.queries` (`summary_table`, over
`trait_scores`, `elicitation`, `suppression`, `heldout_curve`); this module only lays
them out: one block per trait, one line per trial.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import polars as pl

from .queries import summary_table


def summarize(trials: pl.DataFrame, scores: pl.DataFrame, heldout: pl.DataFrame, neutral: str = "",
              traits: Sequence[str] = ()) -> pl.DataFrame:
    """One row per (trial, trait) at the trial's final step: `analysis.summary_table`.

    `neutral` is unused (the trials carry their neutral_id); kept for callers.
    """
    return summary_table(trials, scores, heldout, traits)


def _fmt(mean: float, half: float) -> str:
    if mean is None or math.isnan(mean):
        return "-"
    return f"{mean:6.1f}" + ("" if half is None or math.isnan(half) else f" ±{half:4.1f}")


def _fmt_lp(mean: float, half: float) -> str:
    if mean is None or math.isnan(mean):
        return "-"
    return f"{mean:.3f}" + ("" if half is None or math.isnan(half) else f" ±{half:.3f}")


def _block(df: pl.DataFrame, trait: str) -> list[str]:
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
    return lines


def format_summary(df: pl.DataFrame, trait: str = "") -> str:
    """The summary table, one block per trait (in the frame's order); `trait` names a frame without a trait column."""
    if "trait" in df.columns:
        names = list(dict.fromkeys(df["trait"].to_list()))
        blocks = [_block(df.filter(pl.col("trait").eq_missing(name)), name or trait) for name in names]
    else:
        blocks = [_block(df, trait)]
    lines = [line for i, b in enumerate(blocks) for line in ([""] if i else []) + b]
    lines.append(
        "scores 0-100 at the final step, mean ±95% CI over questions; suppression = paired (control - trial) "
        "under the default condition; elicitation = training - default at step 0."
    )
    return "\n".join(lines)
