"""Charts of the mech stage's tables (<exp>/mech/): the activation-gradient cosine with and
without the defense, and the steering intensity sweep. One function a chart, each taking the
Run and returning an Altair chart, or raising Skip when the run cannot support it."""

from __future__ import annotations

import polars as pl

from .chart_parts import altair, clean, title
from .frames import need, sweep_curves, swept_conditions
from .load import Run, Skip


def chart_grad_cosine(run: Run):
    """Scatter: per sequence and layer, cos(dL/dh, vector) with a defense vs without it, identity line."""
    alt = altair()
    g = need(run.extra.get("mech/grad_cosine"), "mech/grad_cosine.parquet (python -m raysweep.mech)")
    keys = ["model", "sequence_id", "layer", "vector"]
    off = g.filter(pl.col("condition") == "none").select(*keys, pl.col("cosine").alias("off"))
    if not off.height:
        raise Skip("needs the defenseless condition 'none' in mech.conditions")
    df = clean(g.filter(pl.col("condition") != "none").join(off, on=keys)
               .with_columns(layer=pl.col("layer").cast(pl.String)))
    lim = [min(0.0, *df["cosine"].drop_nulls(), *df["off"].drop_nulls()),
           max(0.0, *df["cosine"].drop_nulls(), *df["off"].drop_nulls())]
    conds = sorted(set(df["condition"]))
    points = alt.Chart().mark_point(filled=True, size=40, opacity=0.8).encode(
        x=alt.X("off:Q", title="cos(dL/dh, vector), no defense", scale=alt.Scale(domain=lim)),
        y=alt.Y("cosine:Q", title="cos(dL/dh, vector), defense on", scale=alt.Scale(domain=lim)),
        color=alt.Color("condition:N", sort=conds, title="defense in the pass"),
        shape=alt.Shape("layer:N", title="layer"),
        tooltip=["condition:N", "layer:N", "sequence_id:Q", alt.Tooltip("off:Q", format=".4f"),
                 alt.Tooltip("cosine:Q", format=".4f")])
    identity = alt.Chart(pl.DataFrame({"x": lim, "y": lim})).mark_line(color="gray", strokeDash=[4, 4]).encode(
        x="x:Q", y="y:Q")
    return (
        alt.layer(points, identity).properties(width=260, height=260)
        .facet(column=alt.Column("vector:N", title="vector the gradient is compared with"), data=df)
        .properties(title=title(
            f"{run.name}: activation-gradient cosine with and without the defense",
            "one point per sequence and layer: token-averaged cosine between the loss gradient at the layer "
            "output and the vector; dashed line = no change"))
    )


def chart_intensity(run: Run):
    """Lines: loss and gradient cosine against the steering coefficient, IP on and off, 95% CI over sequences."""
    alt = altair()
    loss = need(run.extra.get("mech/loss"), "mech/loss.parquet (python -m raysweep.mech)")
    cos = need(run.extra.get("mech/grad_cosine"), "mech/grad_cosine.parquet (python -m raysweep.mech)")
    swept = swept_conditions(loss)
    if not swept:
        raise Skip("needs a steering condition with coefs (a coefficient sweep)")

    def panel(y_title: str) -> list:
        base = alt.Chart().encode(x=alt.X("coef:Q", title="steering coefficient"),
                                  color=alt.Color("defense:N", title="sweep"))
        tip = ["defense:N", "coef:Q", alt.Tooltip("mean:Q", format=".4f"), alt.Tooltip("ci:Q", format=".4f"), "n:Q"]
        return [base.mark_area(opacity=0.15).encode(y="lo:Q", y2="hi:Q"),
                base.mark_line(point=True).encode(y=alt.Y("mean:Q", title=y_title, scale=alt.Scale(zero=False)),
                                                  tooltip=tip)]

    lines = clean(sweep_curves(loss, "loss", [], swept))
    cosines = clean(sweep_curves(cos, "cosine", ["layer", "vector"], swept)).with_columns(pl.col("layer").cast(pl.String))
    left = alt.layer(*panel("loss (mean CE over assistant tokens, 95% CI band)"), data=lines).properties(
        width=300, height=240, title="loss")
    right = (alt.layer(*panel("cos(dL/dh, vector) (mean, 95% CI band)")).properties(width=220, height=200)
             .facet(row=alt.Row("layer:N", title="layer"), column=alt.Column("vector:N", title="vector"), data=cosines)
             .properties(title="gradient cosine"))
    return alt.hconcat(left, right).properties(title=title(
        f"{run.name}: steering intensity sweep", "loss and activation-gradient cosine against the coefficient, "
        "with the inoculation prompt in the pass (IP on) and without; 95% CI over sequences"))
