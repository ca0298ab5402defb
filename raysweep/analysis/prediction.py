"""Predicted vs observed (seed 003 Exp 22, made by the run that chose what to train): each
candidate prompt's heuristic value (selection.parquet, sweep/select.py) against the paired
suppression its trained trials achieved, and how well the one predicted the other.

Suppression is `stats.suppression` against the no-defense control at each trial's final
step (control - trial under the default condition, paired over questions, 95% CI). The fit
is `queries.correlation`: Pearson r with its 95% CI (Fisher z), Spearman's rank correlation.
"""

from __future__ import annotations

import math

import polars as pl

from .queries import correlation
from .stats import Frame, at_final_step, suppression

SELECTION_COLUMNS = ("prompt", "heuristic", "value", "rank", "selected_as")
FIT_COLUMNS = ("trait", "mode", "heuristic", "n", "pearson_r", "pearson_lo", "pearson_hi", "pearson_p", "spearman_rho",
               "spearman_p", "n_top", "top_mean", "n_bottom", "bottom_mean", "top_minus_bottom")


def prediction(selection: Frame, trials: Frame, scores: Frame) -> pl.DataFrame:
    """One row per (trait, trained IP trial) with its prompt's heuristic value and its suppression
    (mean, ci, lo, hi, step), then one row per (trait, candidate not trained) with a null
    suppression: the predicted-only prompts. Ordered by trait, then rank."""
    sel = selection.lazy().select(SELECTION_COLUMNS).collect()
    sup = at_final_step(suppression(scores, trials, "control")).filter(pl.col("defense") == "ip")
    observed = sel.join(sup.select("trait", "trial_id", "label", "prompt", "mode", "step", "mean", "ci", "lo", "hi"),
                        on="prompt", how="inner")
    traits = pl.DataFrame({"trait": sup["trait"].unique(maintain_order=True)})
    predicted_only = sel.filter(~pl.col("prompt").is_in(observed["prompt"].implode())).join(traits, how="cross")
    out = pl.concat([observed, predicted_only], how="diagonal_relaxed")
    return out.with_columns(trained=pl.col("mean").is_not_null()).sort(
        "trait", "rank", "prompt", "mode", nulls_last=True, maintain_order=True)


def prediction_fit(pred: pl.DataFrame) -> pl.DataFrame:
    """Per (trait, mode) over the trained prompts: n, Pearson r with its 95% CI (Fisher z) and p,
    Spearman rho and p, and the mean suppression of the top- and bottom-selected prompts."""
    rows = []
    done = pred.filter(pl.col("trained") & pl.col("mean").is_not_nan())
    for (trait, mode), g in done.partition_by(["trait", "mode"], as_dict=True, maintain_order=True).items():
        st = correlation(g["value"].to_list(), g["mean"].to_list())
        ends = {}
        for end in ("top", "bottom"):
            vals = g.filter(pl.col("selected_as") == end)["mean"]
            ends[f"n_{end}"], ends[f"{end}_mean"] = vals.len(), (vals.mean() if vals.len() else math.nan)
        rows.append({"trait": trait, "mode": mode, "heuristic": g["heuristic"][0], **st, **ends,
                     "top_minus_bottom": ends["top_mean"] - ends["bottom_mean"]})
    schema = {c: (pl.String if c in ("trait", "mode", "heuristic") else pl.Int64 if c.startswith("n") else pl.Float64)
              for c in FIT_COLUMNS}
    return pl.DataFrame(rows, schema_overrides=schema).select(FIT_COLUMNS) if rows else pl.DataFrame(schema=schema)


def fit_line(r: dict) -> str:
    """One fit as text: r [CI] (Fisher z), rho, n; the top and bottom means."""
    if r["pearson_r"] is None or math.isnan(r["pearson_r"]):
        text = f"n = {r['n']}: too few trained prompts (or no spread) for a correlation"
    else:
        ci = ("" if math.isnan(r["pearson_lo"]) else f" [95% CI {r['pearson_lo']:+.2f}, {r['pearson_hi']:+.2f}]")
        text = f"Pearson r = {r['pearson_r']:+.2f}{ci}, Spearman rho = {r['spearman_rho']:+.2f}, n = {r['n']}"
    if r["n_top"] and r["n_bottom"]:
        text += (f"; top {r['n_top']}: {r['top_mean']:.1f}, bottom {r['n_bottom']}: {r['bottom_mean']:.1f} "
                 f"(top - bottom = {r['top_minus_bottom']:+.1f} points)")
    return text


def format_prediction(pred: pl.DataFrame, fit: pl.DataFrame) -> str:
    """The summary's predicted-vs-observed block: per trait and mode, the fit and one line per prompt."""
    if not pred.height:
        return ""
    heuristic = pred["heuristic"][0]
    lines = [f"predicted vs observed: {heuristic} against suppression vs the no-defense control "
             "(final step, points, mean ±95% CI over questions)"]
    for r in fit.iter_rows(named=True):
        lines.append(f"  {r['trait']} ({r['mode']}): {fit_line(r)}")
    for trait in pred["trait"].unique(maintain_order=True).to_list():
        lines.append(f"  {trait}: {'rank':>4}  {'prompt':<28} {'selected':<8} {heuristic[:12]:>12}  suppression")
        rows = pred.filter(pl.col("trait") == trait)
        for r in rows.filter(pl.col("trained")).iter_rows(named=True):
            obs = "-" if r["mean"] is None else f"{r['mean']:6.1f}" + (
                "" if r["ci"] is None or math.isnan(r["ci"]) else f" ±{r['ci']:.1f}")
            val = "-" if r["value"] is None or math.isnan(r["value"]) else f"{r['value']:.4g}"
            lines.append(f"  {'':<{len(trait)}}  {r['rank'] if r['rank'] is not None else '-':>4}  {r['prompt'][:28]:<28} "
                         f"{r['selected_as']:<8} {val:>12}  {obs}")
        untrained = rows.filter(~pl.col("trained")).height
        if untrained:
            lines.append(f"  {'':<{len(trait)}}  and {untrained} candidates not trained (predicted only: prediction.parquet)")
    return "\n".join(lines)
