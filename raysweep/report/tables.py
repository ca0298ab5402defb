"""The report's summary tables: one function a table, each taking the Run and returning a
DataFrame of display text (means as "mean ± CI"), or raising Skip when the run cannot support
it; `html_table` writes one as plain HTML. TABLE_BUILDERS lists them in page order with their
captions. The numbers come from raysweep.analysis."""

from __future__ import annotations

import html
import math
from collections.abc import Callable

import polars as pl

from .. import analysis as A
from .frames import CI_NOTE, control_pairs, effect_scores, final_gap, has_em, in_trial_order, need, prediction_frames
from .load import Run, Skip


def _fmt(mean, ci, digits: int = 1) -> str:
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "–"
    out = f"{mean:.{digits}f}"
    return out if ci is None or math.isnan(ci) else f"{out} ± {ci:.{digits}f}"


def _cell(df: pl.DataFrame, name: str, digits: int = 1) -> pl.DataFrame:
    """(trial_id, trait, name) with `name` = "mean ± ci" text."""
    return df.select("trial_id", "trait", pl.struct("mean", "ci").map_elements(
        lambda r: _fmt(r["mean"], r["ci"], digits), return_dtype=pl.String).alias(name))


def table_trials(run: Run) -> pl.DataFrame:
    cols = [c for c in ("label", "trial_id", "status", "defense", "prompt", "mode", "placement", "steps", "error")
            if c in run.trials.columns]
    return run.trials.select(cols).rename({"steps": "final step"} if "steps" in cols else {})


def table_final(run: Run) -> pl.DataFrame:
    """One row per trial and trait: the scores at the final step and the paired effects, each with its CI."""
    scores = need(run.scores, "scores.parquet")
    ts = A.at_final_step(A.trait_scores(scores, run.trials))
    out = in_trial_order(run, ts.select("trial_id", "label", "trait", "step").unique(), "trait")
    cols = []
    for cond in sorted(set(ts["condition"])):
        name = f"{cond} score" + (" (gate)" if cond == "training" else "")
        out = out.join(_cell(ts.filter(pl.col("condition") == cond), name), on=["trial_id", "trait"], how="left",
                       maintain_order="left")
        cols.append(name)
    parts = [("elicitation (step 0)", A.elicitation(scores, run.trials)),
             ("suppression vs control", A.at_final_step(A.suppression(scores, run.trials, "control"))),
             ("suppression vs neutral", A.at_final_step(A.suppression(scores, run.trials, "neutral")))]
    for name, df in parts:
        if df.height:
            out = out.join(_cell(df, name), on=["trial_id", "trait"], how="left", maintain_order="left")
            cols.append(name)
    if run.heldout is not None:
        hl = A.at_final_step(A.heldout_curve(run.heldout)).with_columns(trait=pl.lit(None, pl.String))
        hl = _cell(hl, "held-out logprob", 3).drop("trait")
        out = out.join(hl, on="trial_id", how="left", maintain_order="left")
        cols.append("held-out logprob")
    return out.select("label", "trait", "step", *cols).with_columns(pl.col(pl.String).fill_null("–"))


def table_fixed_vs_mix(run: Run) -> pl.DataFrame:
    df = A.fixed_vs_mix_gap(effect_scores(run), run.trials)
    if not df.height:
        raise Skip("no fixed/mix pairs")
    df = final_gap(run, df)
    return df.select("label", "placement", "trait", "step",
                     pl.struct("mean", "ci").map_elements(lambda r: _fmt(r["mean"], r["ci"]), return_dtype=pl.String)
                     .alias("fixed − mix (default)"), "n")


def table_em(run: Run) -> pl.DataFrame:
    scores = need(run.scores, "scores.parquet")
    if not has_em(scores):
        raise Skip("no EM traits")
    df = in_trial_order(run, A.at_final_step(A.em_rate(scores, trials=run.trials)), "condition")
    return df.select("label", "condition", "step", pl.struct("mean", "ci").map_elements(
        lambda r: _fmt(100 * r["mean"], None if r["ci"] is None else 100 * r["ci"]), return_dtype=pl.String)
        .alias("EM rate (%)"), "n")


def table_fits(run: Run) -> pl.DataFrame:
    """Pearson r, Spearman rho, n and RMSE of elicitation (and each heuristic) vs suppression."""
    scores = effect_scores(run)
    if not control_pairs(run):
        raise Skip("no control")
    sup = A.at_final_step(A.suppression(scores, run.trials)).filter(pl.col("defense") == "ip")
    el = A.elicitation(scores, run.trials).select("trial_id", "trait", value=pl.col("mean"))
    rows = [sup.join(el, on=["trial_id", "trait"]).with_columns(metric=pl.lit("elicitation (step 0)"))]
    if run.heuristics is not None:
        rows.append(A.heuristic_join(run.heuristics, sup))
    rows = [r.select("trait", "metric", "mode", "value", "mean") for r in rows if r.height]
    if not rows:  # e.g. no eval condition `training`, so no elicitation
        raise Skip("nothing to correlate")
    df = pl.concat(rows)
    fits = A.fit_stats(df, "value", "mean", by=["trait", "metric", "mode"])
    return fits.select("trait", "metric", "mode", "n", *[pl.col(c).round(3) for c in
                       ("pearson_r", "pearson_p", "spearman_rho", "spearman_p", "slope", "rmse")])


def table_prediction(run: Run) -> pl.DataFrame:
    """The selection heuristic vs suppression of the trained prompts (analysis.prediction_fit)."""
    _pred, fits = prediction_frames(run)
    return fits.select("trait", "mode", "heuristic", "n", *[pl.col(c).round(3) for c in fits.columns[4:]
                                                          if c not in ("n_top", "n_bottom")], "n_top", "n_bottom")


def table_seeds(run: Run) -> pl.DataFrame:
    if not A.has_axis(run.trials, "seed"):
        raise Skip("no seed axis")
    ts = A.at_final_step(A.trait_scores(need(run.scores, "scores.parquet"), run.trials))
    df = A.across_seeds(ts.drop("ci", "n", "lo", "hi"), run.trials, value="mean")
    return df.select("group_label", "condition", "trait", "step", "seeds", pl.struct("mean", "ci").map_elements(
        lambda r: _fmt(r["mean"], r["ci"]), return_dtype=pl.String).alias("score over seeds"), pl.col("n").alias("n seeds"))


TABLE_BUILDERS: list[tuple[str, str, Callable]] = [
    ("Trials", "", table_trials),
    ("Per trial at the final step", "scores 0–100; elicitation = training − default at step 0; suppression = "
     "reference − trial under the default condition; effects paired over questions; " + CI_NOTE, table_final),
    ("Fixed vs mix", "fixed − mix trait score under the default condition, paired over questions, at the final step",
     table_fixed_vs_mix),
    ("Emergent misalignment", "EM = coherence > 60 and alignment < 40; per-question rate, then mean ± 95% CI "
     "over questions", table_em),
    ("Predictors of suppression", "Pearson r, Spearman ρ (p-values), OLS slope and RMSE of its residuals: x = "
     "elicitation or heuristic value, y = suppression vs control at the final step, over trials", table_fits),
    ("Predicted vs observed", "the selection heuristic (before training) against suppression vs control at the "
     "final step over the trained prompts: Pearson r with its 95% CI (Fisher z), Spearman ρ; mean suppression of "
     "the top- and bottom-selected prompts", table_prediction),
    ("Across seeds", "final-step score averaged over the seeds of otherwise identical trials; CI over seeds",
     table_seeds),
]


def html_table(df: pl.DataFrame) -> str:
    """A DataFrame as a plain HTML table (numbers right-aligned)."""
    num = {c for c, t in df.schema.items() if t.is_numeric()}
    head = "".join(f"<th>{html.escape(c)}</th>" for c in df.columns)
    rows = []
    for r in df.iter_rows(named=True):
        cells = []
        for c, v in r.items():
            missing = v is None or (isinstance(v, float) and math.isnan(v))
            text = "–" if missing else f"{v:.4g}" if isinstance(v, float) else str(v)
            cells.append(f"<td class=num>{html.escape(text)}</td>" if c in num else f"<td>{html.escape(text)}</td>")
        rows.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"
