"""The pieces the report's Altair charts share: titles, axes, colours, scatter panels with
their fits, and heatmap matrices. Altair is imported when a chart is drawn, not at import."""

from __future__ import annotations

import math

import polars as pl

from .. import analysis as A


def altair():
    """Altair, imported on first use, with no row limit on inline data."""
    import altair as alt

    alt.data_transformers.disable_max_rows()
    return alt


def title(text: str, *subtitle: str):
    return altair().TitleParams(text, subtitle=list(subtitle), anchor="start")


def clean(df: pl.DataFrame) -> pl.DataFrame:
    """NaN -> null (JSON has no NaN) and only plain columns for the chart data."""
    keep = [c for c, t in df.schema.items() if t.is_numeric() or t == pl.String]
    return df.select(keep).with_columns(pl.col(pl.Float64).fill_nan(None))


def x_trials(alt, order: list[str], title: str = "trial"):
    return alt.X("label:N", sort=order, title=title, axis=alt.Axis(labelAngle=-35, labelLimit=220))


def score_domain(df: pl.DataFrame, lo: float = 0.0, hi: float = 100.0) -> list[float]:
    vals = [v for v in df["lo"].to_list() + df["hi"].to_list() + df["mean"].to_list() if v is not None and math.isfinite(v)]
    return [min([lo, *vals]), max([hi, *vals])]


def trial_color(alt, order: list[str], legend: bool = True):
    return alt.Color("label:N", sort=order, title="trial", legend=alt.Legend() if legend else None)


def step_x(alt, steps: list[int]):
    axis = alt.Axis(values=steps) if len(steps) <= 12 else alt.Axis()
    return alt.X("step:Q", title="training step (symlog axis)", scale=alt.Scale(type="symlog"), axis=axis)


def scatter_panels(df: pl.DataFrame, x: str, x_lo: str | None, x_hi: str | None, x_title: str, y_title: str,
                   panel_cols: list[str]):
    """One scatter per panel: points with CI bars, OLS line with its 95% CI band, r / rho / n / RMSE in the title."""
    alt = altair()
    panels = []
    groups = df.partition_by(panel_cols, as_dict=True)
    for key, g in sorted(groups.items(), key=lambda kv: [str(k) for k in kv[0]]):
        st = A.correlation(g[x].to_list(), g["mean"].to_list())
        name = " · ".join(str(k) for k in key)
        stats = (f"r = {st['pearson_r']:+.2f}, ρ = {st['spearman_rho']:+.2f}, n = {st['n']}, RMSE = {st['rmse']:.1f}"
                 if not math.isnan(st["pearson_r"]) else f"n = {st['n']} (too few points or no spread for a fit)")
        enc = {"x": alt.X(f"{x}:Q", title=x_title, scale=alt.Scale(zero=False)),
               "y": alt.Y("mean:Q", title=y_title, scale=alt.Scale(zero=False))}
        col = alt.value("#4c78a8")
        tip = ["label:N", alt.Tooltip(f"{x}:Q", format=".3g"), alt.Tooltip("mean:Q", format=".1f"),
               alt.Tooltip("ci:Q", format=".1f")]
        pts = alt.Chart(clean(g)).encode(**enc)
        layers = [pts.mark_rule(opacity=0.6).encode(y="lo:Q", y2="hi:Q", color=col)]
        if x_lo and x_hi:
            layers.append(pts.mark_rule(opacity=0.6).encode(x=f"{x_lo}:Q", x2=f"{x_hi}:Q", color=col))
        layers.append(pts.mark_point(filled=True, size=60).encode(color=col, tooltip=tip))
        panels.append(alt.layer(*fit_layers(g[x].to_list(), g["mean"].to_list()), *layers).properties(width=260, height=220, title=title(name, stats)))
    return alt.concat(*panels, columns=min(3, len(panels)))


def fit_layers(x, y) -> list:
    """The OLS line of y on x with the 95% CI band of its mean (analysis.fit_band), as two
    layers to draw under a scatter; none when there is no fit."""
    alt = altair()
    band = A.fit_band(x, y)
    if not band.height:
        return []
    line = alt.Chart(band).encode(x="x:Q")
    return [line.mark_area(opacity=0.15, color="gray").encode(y="lo:Q", y2="hi:Q"),
            line.mark_line(color="black").encode(y="fit:Q")]


def matrix(alt, df: pl.DataFrame, value: str, legend: str, scheme: str, domain: list[float] | None, columns: list[str],
           rows: list[str]):
    """A heatmap of `value` per (starting model, post-finetuning data), the numbers written in the cells."""
    enc = {"x": alt.X("post:N", sort=columns, title="post-finetuning data"),
           "y": alt.Y("start:N", sort=rows, title="starting model (pre-finetuning data)")}
    scale = alt.Scale(scheme=scheme, domain=domain) if domain else alt.Scale(scheme=scheme)
    rect = alt.Chart().mark_rect().encode(**enc, color=alt.Color(f"{value}:Q", title=legend, scale=scale),
                                          tooltip=["method:N", "start:N", "post:N", alt.Tooltip(f"{value}:Q", format=".1f")])
    text = alt.Chart().mark_text(fontSize=10).encode(**enc, text=alt.Text(f"{value}:Q", format=".1f"))
    return alt.layer(rect, text, data=clean(df)).properties(width=alt.Step(48), height=alt.Step(28))
