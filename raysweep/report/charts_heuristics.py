"""Charts of the heuristics stage's tables: each heuristic against suppression, the prompts'
PCA / SVD embeddings and the angles between prompts. One function a chart, each taking the
Run and returning an Altair chart, or raising Skip when the run cannot support it."""

from __future__ import annotations

import polars as pl

from .. import analysis as A
from ..analysis.prediction import fit_line
from .chart_parts import altair, clean, fit_layers, scatter_panels, title
from .frames import (control_pairs, effect_scores, embedding_points, final_note, need, prediction_frames, prompt_labels,
                     prompt_order, prompt_suppression)
from .load import Run, Skip


def chart_heuristics(run: Run):
    """Scatter: each heuristic (heuristics.parquet) vs suppression at the final step, with OLS fit and band."""
    h = need(run.heuristics, "heuristics.parquet (prompt_key, metric, value)")
    scores = effect_scores(run)
    if not control_pairs(run):
        raise Skip("needs a no-defense control trial (trials.parquet control_id)")
    df = A.heuristic_join(h, A.at_final_step(A.suppression(scores, run.trials)))
    if not df.height:
        raise Skip("no heuristic prompt_key matches a trial's prompt")
    df = df.with_columns(pl.col("mode").replace("", "-"))
    chart = scatter_panels(df, "value", None, None, "heuristic value", "suppression vs control (points)",
                           ["trait", "metric", "mode"])
    return chart.properties(title=title(
        f"{run.name}: heuristics vs suppression at {final_note(df)}",
        "one point per trial (bars = 95% CI, paired over questions); line = OLS fit with its 95% CI band"))


def chart_embeddings(run: Run):
    """Points: each prompt's PCA / SVD coordinates of its point-wise W row, coloured by suppression."""
    alt = altair()
    points = embedding_points(need(run.heuristics, "heuristics.parquet"))
    df = points.join(prompt_labels(run), on="prompt", how="left").with_columns(pl.col("group").fill_null(""))
    effects = prompt_suppression(run)
    coloured = effects is not None
    df = df.join(effects, on=["prompt", "mode"], how="left") if coloured else df.with_columns(suppression=pl.lit(None, pl.Float64))
    df = clean(df)
    tip = ["prompt:N", "group:N", alt.Tooltip("c1:Q", format=".3f"), alt.Tooltip("c2:Q", format=".3f"),
           alt.Tooltip("suppression:Q", format=".1f")]
    base = alt.Chart().encode(x=alt.X("c1:Q", title="component 1 (coordinate)"),
                              y=alt.Y("c2:Q", title="component 2 (coordinate)"), tooltip=tip,
                              shape=alt.Shape("group:N", title="trait group"))
    layers = [base.mark_point(size=70, filled=True, color="lightgray")]
    if coloured:
        layers.append(base.transform_filter("isValid(datum.suppression)").mark_point(size=70, filled=True).encode(
            color=alt.Color("suppression:Q", title="suppression (points)", scale=alt.Scale(scheme="viridis"))))
    note = ("colour = suppression vs the no-defense control (grey: no trial for that prompt and prefix type)"
            if coloured else "no suppression available for these prompts (no control-paired trials, no suppression table)")
    return (
        alt.layer(*layers, data=df).properties(width=300, height=260)
        .facet(facet=alt.Facet("panel:N", title=None), columns=2)
        .resolve_scale(x="independent", y="independent")
        .properties(title=title(f"{run.name}: prompt embeddings from the point-wise W matrices", note,
                                "one point per prompt (its row of W: logprob shifts over training examples)"))
    )


def chart_angles(run: Run):
    """Heatmaps: pairwise angles between prompts in raw W and its 2-D PCA / SVD coordinates."""
    alt = altair()
    a = need(run.extra.get("angles"), "angles.parquet (the heuristics stage)").filter(pl.col("granularity") == "point")
    if not a.height:
        raise Skip("angles.parquet has no point-wise angles")
    order = prompt_order(run, a["prompt_a"].to_list())
    df = clean(a.filter(pl.col("prompt_a") != pl.col("prompt_b")))
    axis = alt.Axis(labelFontSize=8, labelLimit=120)
    return (
        alt.Chart(df).mark_rect().encode(
            x=alt.X("prompt_a:N", sort=order, title="prompt", axis=axis),
            y=alt.Y("prompt_b:N", sort=order, title="prompt", axis=axis),
            color=alt.Color("angle_deg:Q", title="angle (degrees)", scale=alt.Scale(scheme="viridis")),
            tooltip=["prompt_a:N", "prompt_b:N", alt.Tooltip("angle_deg:Q", format=".1f")])
        .properties(width=alt.Step(9), height=alt.Step(9))
        .facet(row=alt.Row("representation:N", title="representation (raw W, PCA-2, SVD-2)"),
               column=alt.Column("variant:N", title="prefix type"))
        .properties(title=title(f"{run.name}: pairwise angles between prompts (point-wise W rows)",
                                "arccos of the cosine between two prompts' vectors; prompts grouped by trait"))
    )


def chart_prediction(run: Run):
    """Scatter per trait and mode: the selection heuristic (selection.parquet) against each trained
    prompt's suppression, with CIs, the OLS fit and band, r [Fisher CI] and rho; the candidates
    not trained as predicted-only ticks on the heuristic axis (seed 003 Exp 22)."""
    alt = altair()
    pred, fits = prediction_frames(run)
    heuristic = fits["heuristic"][0]
    colours = alt.Scale(domain=["top", "bottom", "random", "control"], range=["#d62728", "#1f77b4", "#7f7f7f", "#2ca02c"])
    panels = []
    for fit in fits.iter_rows(named=True):
        trained = pred.filter((pl.col("trait") == fit["trait"]) & pl.col("trained") & (pl.col("mode") == fit["mode"]))
        others = pred.filter((pl.col("trait") == fit["trait"]) & ~pl.col("trained"))
        floor = min([0.0, *[v for v in trained["lo"].to_list() if v is not None]]) - 5.0
        others = others.with_columns(floor=pl.lit(floor))
        x = alt.X("value:Q", title=f"{heuristic} (before training)", scale=alt.Scale(zero=False))
        tip = ["prompt:N", "selected_as:N", alt.Tooltip("rank:Q"), alt.Tooltip("value:Q", format=".4g")]
        pts = alt.Chart(clean(trained)).encode(x=x, y=alt.Y("mean:Q", title="suppression vs control (points)"))
        layers = [pts.mark_rule(opacity=0.6).encode(y="lo:Q", y2="hi:Q", color=alt.Color("selected_as:N", scale=colours)),
                  pts.mark_point(filled=True, size=70).encode(
                      color=alt.Color("selected_as:N", scale=colours, title="selected as"),
                      tooltip=tip + [alt.Tooltip("mean:Q", format=".1f"), alt.Tooltip("ci:Q", format=".1f")]),
                  alt.Chart(clean(others)).mark_tick(color="black", opacity=0.5, thickness=1, size=12).encode(
                      x=x, y=alt.Y("floor:Q"), tooltip=tip)]
        layers = fit_layers(trained["value"].to_list(), trained["mean"].to_list()) + layers
        panels.append(alt.layer(*layers).properties(width=320, height=260, title=title(
            f"{fit['trait']} · {fit['mode']}", fit_line(fit))))
    return alt.concat(*panels, columns=min(2, len(panels))).properties(title=title(
        f"{run.name}: predicted ({heuristic}) vs observed suppression",
        "points: trained prompts (bars = 95% CI, paired over questions, final step); ticks at the bottom: candidates "
        "not trained (predicted only); line = OLS fit with its 95% CI band"))
