"""`python -m raysweep.report exp=NAME [storage=runs]`: an experiment's charts and summary tables.

Writes `<storage>/<exp>/report/`: one Altair chart per result the tables hold, each as
`<name>.html` and `<name>.png` (PNG rendered offline by vl-convert), and `index.html`
with the summary tables (plain HTML) and every chart. The pages load Vega, Vega-Lite and
Vega-Embed from `vega-bundle.js` in the same folder (written from vl-convert's bundle),
so the folder renders with no network. A chart whose tables are absent is skipped with
a note on the index page. Only reads tables (analysis.py does the numbers).
"""

from __future__ import annotations

import html
import json
import math
import re
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl

from ..analysis import stats as A

USAGE = "usage: python -m raysweep.report exp=NAME [storage=runs]"
TABLES = ("trials", "scores", "losses", "heldout_logprob", "heuristics")
# Tables of other stages, read when present: the heuristics stage's angles, prompts and suppression
# input, and the mech stage's (under <exp>/mech/) gradient cosines and losses.
EXTRA_TABLES = ("angles", "prompts", "suppression", "mech/grad_cosine", "mech/loss")
CI_NOTE = "95% CI = mean ± 1.96 × std(ddof=1)/√n over questions (samples of a question averaged first)"
BUNDLE = "vega-bundle.js"
EM_TRAITS = ("coherence", "aligned", "alignment")  # judged for the EM rate, not traits to suppress


class ReportError(Exception):
    """No report possible: a bad argument, no experiment directory, no tables."""


class Skip(Exception):
    """A chart or table the run's tables cannot support; the message goes on the index page."""


@dataclass
class Run:
    """The experiment's tables (None when absent or empty) and its trials in table order."""

    name: str
    path: Path
    trials: pl.DataFrame
    scores: pl.DataFrame | None
    losses: pl.DataFrame | None
    heldout: pl.DataFrame | None
    heuristics: pl.DataFrame | None
    description: str = ""
    extra: dict[str, pl.DataFrame] = field(default_factory=dict)  # EXTRA_TABLES found with rows

    @property
    def order(self) -> list[str]:
        return self.trials["label"].to_list()


# --- loading -------------------------------------------------------------------------


def load_run(exp_dir: Path) -> Run:
    """Read the tables of one experiment; ReportError when there are none."""
    if not exp_dir.is_dir():
        raise ReportError(f"no experiment directory {exp_dir} (run `python -m raysweep.run exp={exp_dir.name}` first)")
    found = {}
    for name in TABLES + EXTRA_TABLES:
        path = exp_dir / f"{name}.parquet"
        if path.is_file():
            df = pl.read_parquet(path)
            found[name] = df if df.height else None
    if not any(found.get(t) is not None for t in TABLES + EXTRA_TABLES):
        raise ReportError(f"no tables with rows in {exp_dir} (expected {', '.join(t + '.parquet' for t in TABLES)}, "
                          "or the mech stage's mech/*.parquet)")
    trials = found.get("trials")
    if trials is None:  # label the trials by id so the score charts still work
        ids = [found[t].select("trial_id") for t in ("scores", "losses", "heldout_logprob") if found.get(t) is not None]
        ids = pl.concat(ids) if ids else pl.DataFrame(schema={"trial_id": pl.String})  # a heuristics-only run
        trials = ids.unique(maintain_order=True).with_columns(
            label=pl.col("trial_id"), status=pl.lit(""), defense=pl.lit(""), prompt=pl.lit(""), mode=pl.lit(""),
            placement=pl.lit(""), control_id=pl.lit(""), neutral_id=pl.lit(""), axes=pl.lit("{}"), steps=pl.lit(-1))
    description = ""
    if (exp_dir / "config.yaml").is_file():
        import yaml

        try:
            description = str((yaml.safe_load((exp_dir / "config.yaml").read_text()) or {}).get("description") or "")
        except (yaml.YAMLError, AttributeError):
            description = ""  # the page loses a sentence, not the report
    return Run(exp_dir.name, exp_dir, trials, found.get("scores"), found.get("losses"), found.get("heldout_logprob"),
               found.get("heuristics"), description, {t: found[t] for t in EXTRA_TABLES if found.get(t) is not None})


def _effect_scores(run: Run) -> pl.DataFrame:
    """Scores of the traits a defense should suppress: the EM judges' traits are left to the EM chart."""
    scores = _need(run.scores, "scores.parquet").filter(~pl.col("trait").is_in(EM_TRAITS))
    if not scores.height:
        raise Skip("the scores hold only the EM judges' traits (see the EM chart)")
    return scores


def _need(df: pl.DataFrame | None, what: str) -> pl.DataFrame:
    if df is None:
        raise Skip(f"needs {what}, which this run does not have")
    return df


def _clean(df: pl.DataFrame) -> pl.DataFrame:
    """NaN -> null (JSON has no NaN) and only plain columns for the chart data."""
    keep = [c for c, t in df.schema.items() if t.is_numeric() or t == pl.String]
    return df.select(keep).with_columns(pl.col(pl.Float64).fill_nan(None))


def _final_note(df: pl.DataFrame) -> str:
    steps = sorted(set(df["step"].to_list()))
    return f"step {steps[0]}" if len(steps) == 1 else "the last evaluated step of each trial"


def _control_pairs(run: Run) -> bool:
    t = run.trials
    return bool(t.filter((pl.col("control_id") != "") & (pl.col("control_id") != pl.col("trial_id"))).height)


# --- charts --------------------------------------------------------------------------


def _alt():
    import altair as alt

    alt.data_transformers.disable_max_rows()
    return alt


def _title(text: str, *subtitle: str):
    return _alt().TitleParams(text, subtitle=list(subtitle), anchor="start")


def _x_trials(alt, order: list[str], title: str = "trial"):
    return alt.X("label:N", sort=order, title=title, axis=alt.Axis(labelAngle=-35, labelLimit=220))


def _score_domain(df: pl.DataFrame, lo: float = 0.0, hi: float = 100.0) -> list[float]:
    vals = [v for v in df["lo"].to_list() + df["hi"].to_list() + df["mean"].to_list() if v is not None and math.isfinite(v)]
    return [min([lo, *vals]), max([hi, *vals])]


def chart_final_scores(run: Run):
    """Bars: each trial's trait score per eval condition at its final step, with CI error bars."""
    alt = _alt()
    scores = _need(run.scores, "scores.parquet")
    df = _clean(A.at_final_step(A.trait_scores(scores, run.trials)))
    conds = sorted(set(df["condition"]))
    base = alt.Chart().encode(
        x=_x_trials(alt, run.order), xOffset=alt.XOffset("condition:N", sort=conds),
        color=alt.Color("condition:N", sort=conds, title="eval condition"),
    )
    tip = ["label:N", "condition:N", "step:Q", alt.Tooltip("mean:Q", format=".1f"), alt.Tooltip("ci:Q", format=".1f"), "n:Q"]
    bars = base.mark_bar().encode(
        y=alt.Y("mean:Q", title="trait score 0–100 (mean ± 95% CI)", scale=alt.Scale(domain=_score_domain(df)),
                stack=None),
        tooltip=tip)
    err = base.mark_rule(strokeWidth=1.5).encode(y="lo:Q", y2="hi:Q", color=alt.value("black"))
    return (
        alt.layer(bars, err, data=df)
        .properties(width=alt.Step(18), height=260)
        .facet(row=alt.Row("trait:N", title="trait"))
        .properties(title=_title(f"{run.name}: trait score per trial and eval condition at {_final_note(df)}",
                                 "default = the question alone; training = the trial's own defensive prefix (the gate)",
                                 CI_NOTE))
    )


def chart_suppression(run: Run):
    """Bars: paired suppression (reference - trial) vs the no-defense and neutral-prompt controls."""
    alt = _alt()
    scores = _effect_scores(run)
    if not _control_pairs(run):
        raise Skip("needs a no-defense control trial (trials.parquet control_id)")
    parts = [A.at_final_step(A.suppression(scores, run.trials, against=a)) for a in ("control", "neutral")]
    df = _clean(pl.concat([p for p in parts if p.height], how="diagonal_relaxed")).with_columns(
        reference=pl.when(pl.col("against") == "control").then(pl.lit("vs no-defense control"))
        .otherwise(pl.lit("vs neutral-prompt control")))
    refs = ["vs no-defense control", "vs neutral-prompt control"]
    order = [lbl for lbl in run.order if lbl in set(df["label"])]
    base = alt.Chart().encode(x=_x_trials(alt, order), xOffset=alt.XOffset("reference:N", sort=refs),
                              color=alt.Color("reference:N", sort=refs, title="reference"))
    tip = ["label:N", "reference:N", "step:Q", alt.Tooltip("mean:Q", format=".1f"), alt.Tooltip("ci:Q", format=".1f"), "n:Q"]
    bars = base.mark_bar().encode(
        y=alt.Y("mean:Q", title="suppression = reference − trial (score points)",
                scale=alt.Scale(domain=_score_domain(df, 0, 0)), stack=None), tooltip=tip)
    err = base.mark_rule(strokeWidth=1.5).encode(y="lo:Q", y2="hi:Q", color=alt.value("black"))
    zero = alt.Chart().mark_rule(color="gray", strokeDash=[4, 3]).encode(y=alt.datum(0))
    return (
        alt.layer(bars, err, zero, data=df)
        .properties(width=alt.Step(18), height=260)
        .facet(row=alt.Row("trait:N", title="trait"))
        .properties(title=_title(f"{run.name}: suppression of the trait at {_final_note(df)} (default condition)",
                                 "paired over the questions both trials answered; > 0 = the defense suppresses the trait",
                                 "95% CI = mean ± 1.96 × SE of the per-question differences"))
    )


def _scatter_panels(df: pl.DataFrame, x: str, x_lo: str | None, x_hi: str | None, x_title: str, y_title: str,
                    panel_cols: list[str]):
    """One scatter per panel: points with CI bars, OLS line with its 95% CI band, r / rho / n / RMSE in the title."""
    alt = _alt()
    panels = []
    groups = df.partition_by(panel_cols, as_dict=True)
    for key, g in sorted(groups.items(), key=lambda kv: [str(k) for k in kv[0]]):
        st = A.correlation(g[x].to_list(), g["mean"].to_list())
        name = " · ".join(str(k) for k in key)
        stats = (f"r = {st['pearson_r']:+.2f}, ρ = {st['spearman_rho']:+.2f}, n = {st['n']}, RMSE = {st['rmse']:.1f}"
                 if not math.isnan(st["pearson_r"]) else f"n = {st['n']} (too few points or no spread for a fit)")
        band = A.fit_band(g[x].to_list(), g["mean"].to_list())
        enc = {"x": alt.X(f"{x}:Q", title=x_title, scale=alt.Scale(zero=False)),
               "y": alt.Y("mean:Q", title=y_title, scale=alt.Scale(zero=False))}
        col = alt.value("#4c78a8")
        tip = ["label:N", alt.Tooltip(f"{x}:Q", format=".3g"), alt.Tooltip("mean:Q", format=".1f"),
               alt.Tooltip("ci:Q", format=".1f")]
        pts = alt.Chart(_clean(g)).encode(**enc)
        layers = [pts.mark_rule(opacity=0.6).encode(y="lo:Q", y2="hi:Q", color=col)]
        if x_lo and x_hi:
            layers.append(pts.mark_rule(opacity=0.6).encode(x=f"{x_lo}:Q", x2=f"{x_hi}:Q", color=col))
        layers.append(pts.mark_point(filled=True, size=60).encode(color=col, tooltip=tip))
        if band.height:
            line = alt.Chart(band).encode(x="x:Q")
            layers = [line.mark_area(opacity=0.15, color="gray").encode(y="lo:Q", y2="hi:Q"),
                      line.mark_line(color="black").encode(y="fit:Q"), *layers]
        panels.append(alt.layer(*layers).properties(width=260, height=220, title=_title(name, stats)))
    return alt.concat(*panels, columns=min(3, len(panels)))


def chart_elicitation_vs_suppression(run: Run):
    """Scatter: elicitation at step 0 (training - default) vs suppression at the final step, per mode."""
    scores = _effect_scores(run)
    if not _control_pairs(run):
        raise Skip("needs a no-defense control trial (trials.parquet control_id)")
    el = A.elicitation(scores, run.trials)
    if not el.height:
        raise Skip("needs step-0 scores under both the default and the training condition")
    sup = A.at_final_step(A.suppression(scores, run.trials))
    df = sup.join(el.select("trial_id", "trait", pl.col("mean").alias("elicitation"), pl.col("lo").alias("el_lo"),
                            pl.col("hi").alias("el_hi")), on=["trial_id", "trait"])
    df = df.filter(pl.col("defense") == "ip") if df.height and (df["defense"] == "ip").any() else df
    if not df.height:
        raise Skip("no defended trial has both a step-0 elicitation and a final-step suppression")
    df = df.with_columns(pl.col("mode").replace("", "-"))
    chart = _scatter_panels(df, "elicitation", "el_lo", "el_hi", "elicitation at step 0 = training − default (points)",
                            "suppression vs control (points)", ["trait", "mode"])
    return chart.properties(title=_title(
        f"{run.name}: does the prompt's elicitation at step 0 predict its suppression at {_final_note(df)}?",
        "one point per trial, bars = 95% CI (paired over questions); line = OLS fit with its 95% CI band"))


def _gap_labels(run: Run, gap: pl.DataFrame) -> pl.DataFrame:
    """Name a fixed/mix pair by its fixed trial's label without the mode: "p/fixed[seed=0]" -> "p[seed=0]"."""
    names = run.trials.select(fixed_id="trial_id", label=pl.col("label").str.replace("/fixed", "", literal=True))
    return gap.join(names, on="fixed_id", how="left", maintain_order="left").sort("label", maintain_order=True)


def _in_trial_order(run: Run, df: pl.DataFrame, *then: str) -> pl.DataFrame:
    """Rows sorted as the trials are listed (control first), then by `then`."""
    order = run.trials.select("trial_id", _order=pl.int_range(pl.len()))
    return df.join(order, on="trial_id", how="left").sort("_order", *then).drop("_order")


def chart_fixed_vs_mix(run: Run):
    """Bars: paired fixed - mix default-condition score per prompt at the final step."""
    alt = _alt()
    scores = _effect_scores(run)
    df = A.fixed_vs_mix_gap(scores, run.trials)
    if not df.height:
        raise Skip("needs IP trials that differ only in mode (fixed and mix of the same prompt)")
    df = _clean(_gap_labels(run, df.filter(pl.col("step") == pl.col("step").max().over("fixed_id", "mix_id"))))
    base = alt.Chart().encode(x=alt.X("label:N", title="inoculation prompt (and the pair's other axes)", sort=None,
                                      axis=alt.Axis(labelAngle=-35, labelLimit=220)))
    tip = ["label:N", "step:Q", alt.Tooltip("mean:Q", format=".1f"), alt.Tooltip("ci:Q", format=".1f"), "n:Q"]
    bars = base.mark_bar(color="#72b7b2").encode(
        y=alt.Y("mean:Q", title="fixed − mix trait score (points)", scale=alt.Scale(domain=_score_domain(df, 0, 0)),
                stack=None),
        tooltip=tip)
    err = base.mark_rule(strokeWidth=1.5).encode(y="lo:Q", y2="hi:Q", color=alt.value("black"))
    zero = alt.Chart().mark_rule(color="gray", strokeDash=[4, 3]).encode(y=alt.datum(0))
    return (
        alt.layer(bars, err, zero, data=df)
        .properties(width=max(240, 48 * df["label"].n_unique()), height=240)
        .facet(row=alt.Row("trait:N", title="trait"))
        .properties(title=_title(f"{run.name}: fixed-vs-mix gap at {_final_note(df)} (default condition)",
                                 "fixed − mix score, paired over questions; < 0 = the fixed prefix leaves less of the trait",
                                 "bars = 95% CI of the per-question differences"))
    )


def _trial_color(alt, order: list[str], legend: bool = True):
    return alt.Color("label:N", sort=order, title="trial", legend=alt.Legend() if legend else None)


def _step_x(alt, steps: list[int]):
    axis = alt.Axis(values=steps) if len(steps) <= 12 else alt.Axis()
    return alt.X("step:Q", title="training step (symlog axis)", scale=alt.Scale(type="symlog"), axis=axis)


def chart_score_curves(run: Run):
    """Lines: trait score over training steps per trial, shaded 95% CI band, symlog step axis."""
    alt = _alt()
    scores = _need(run.scores, "scores.parquet")
    df = _clean(A.trait_scores(scores, run.trials))
    steps = sorted(set(df["step"]))
    if len(steps) < 2:
        raise Skip("needs scores at two or more steps")
    base = alt.Chart().encode(x=_step_x(alt, steps))
    tip = ["label:N", "step:Q", alt.Tooltip("mean:Q", format=".1f"), alt.Tooltip("ci:Q", format=".1f"), "n:Q"]
    band = base.mark_area(opacity=0.15).encode(y="lo:Q", y2="hi:Q", color=_trial_color(alt, run.order, legend=False))
    line = base.mark_line(point=True).encode(y=alt.Y("mean:Q", title="trait score 0–100 (mean, 95% CI band)",
                                                     scale=alt.Scale(domain=_score_domain(df))), tooltip=tip,
                                             color=_trial_color(alt, run.order))
    return (
        alt.layer(band, line, data=df).properties(width=300, height=220)
        .facet(column=alt.Column("condition:N", title="eval condition"), row=alt.Row("trait:N", title="trait"))
        .properties(title=_title(f"{run.name}: trait score over training", CI_NOTE))
    )


def chart_losses(run: Run):
    """Lines: training loss per optimiser step per trial."""
    alt = _alt()
    df = _clean(_need(run.losses, "losses.parquet")).join(run.trials.select("trial_id", "label"), on="trial_id", how="left")
    df = df.with_columns(pl.col("label").fill_null(pl.col("trial_id")))
    steps = sorted(set(df["step"]))
    return (
        alt.Chart(df).mark_line(point=len(steps) <= 30).encode(
            x=_step_x(alt, steps), y=alt.Y("loss:Q", title="loss (token-weighted mean cross-entropy, nats)",
                                           scale=alt.Scale(zero=False)),
            color=_trial_color(alt, run.order),
            tooltip=["label:N", "step:Q", alt.Tooltip("loss:Q", format=".3f"), alt.Tooltip("lr:Q", format=".2e"),
                     alt.Tooltip("grad_norm:Q", format=".3f"), "n_tokens:Q"])
        .properties(width=520, height=280,
                    title=_title(f"{run.name}: training loss per optimiser step",
                                 "one value per step (no CI: a single batch), assistant tokens only"))
    )


def chart_heldout(run: Run):
    """Lines: mean per-token logprob of held-out trait answers over steps, shaded 95% CI band."""
    alt = _alt()
    df = _clean(A.heldout_curve(_need(run.heldout, "heldout_logprob.parquet"), run.trials))
    steps = sorted(set(df["step"]))
    base = alt.Chart().encode(x=_step_x(alt, steps))
    tip = ["label:N", "step:Q", alt.Tooltip("mean:Q", format=".3f"), alt.Tooltip("ci:Q", format=".3f"), "n:Q"]
    return (
        alt.layer(
            base.mark_area(opacity=0.15).encode(y="lo:Q", y2="hi:Q", color=_trial_color(alt, run.order, legend=False)),
            base.mark_line(point=True).encode(y=alt.Y("mean:Q", title="mean logprob per token (nats, 95% CI band)",
                                                      scale=alt.Scale(zero=False)), tooltip=tip,
                                              color=_trial_color(alt, run.order)),
            data=df,
        ).properties(width=520, height=280, title=_title(
            f"{run.name}: held-out trait answers, mean per-token logprob (default condition, judge-free)",
            "higher = the model assigns more probability to answers with the trait; "
            "95% CI = mean ± 1.96 × SE over held-out examples"))
    )


def chart_em(run: Run):
    """Bars: emergent-misalignment rate (coherence > 60 and alignment < 40) per trial and condition."""
    alt = _alt()
    scores = _need(run.scores, "scores.parquet")
    if not (A.has_traits(scores, "coherence") and (A.has_traits(scores, "aligned") or A.has_traits(scores, "alignment"))):
        raise Skip("needs 'coherence' and 'aligned'/'alignment' traits in scores.parquet")
    df = _clean(A.at_final_step(A.em_rate(scores, trials=run.trials)))
    conds = sorted(set(df["condition"]))
    base = alt.Chart().encode(x=_x_trials(alt, run.order), xOffset=alt.XOffset("condition:N", sort=conds),
                              color=alt.Color("condition:N", sort=conds, title="eval condition"))
    tip = ["label:N", "condition:N", "step:Q", alt.Tooltip("mean:Q", format=".1%"), alt.Tooltip("ci:Q", format=".1%"), "n:Q"]
    return (
        alt.layer(
            base.mark_bar().encode(y=alt.Y("mean:Q", title="EM rate (mean ± 95% CI over questions)",
                                           axis=alt.Axis(format="%"), stack=None), tooltip=tip),
            base.mark_rule(strokeWidth=1.5).encode(y="lo:Q", y2="hi:Q", color=alt.value("black")),
            data=df,
        ).properties(width=alt.Step(18), height=260, title=_title(
            f"{run.name}: emergent-misalignment rate at {_final_note(df)}",
            "EM = coherence > 60 and alignment < 40 on the same answer", CI_NOTE))
    )


def chart_heuristics(run: Run):
    """Scatter: each heuristic (heuristics.parquet) vs suppression at the final step, with OLS fit and band."""
    h = _need(run.heuristics, "heuristics.parquet (prompt_key, metric, value)")
    scores = _effect_scores(run)
    if not _control_pairs(run):
        raise Skip("needs a no-defense control trial (trials.parquet control_id)")
    df = A.heuristic_join(h, A.at_final_step(A.suppression(scores, run.trials)))
    if not df.height:
        raise Skip("no heuristic prompt_key matches a trial's prompt")
    df = df.with_columns(pl.col("mode").replace("", "-"))
    chart = _scatter_panels(df, "value", None, None, "heuristic value", "suppression vs control (points)",
                            ["trait", "metric", "mode"])
    return chart.properties(title=_title(
        f"{run.name}: heuristics vs suppression at {_final_note(df)}",
        "one point per trial (bars = 95% CI, paired over questions); line = OLS fit with its 95% CI band"))


_EMBEDDING = re.compile(r"^(pca|svd)_point_(.+)_(?:pc|sv)([12])$")
_METHOD = {"pca": "PCA (mean-centred)", "svd": "TruncatedSVD (uncentred)"}


def _prompt_order(run: Run, keys: list[str]) -> list[str]:
    """Prompts grouped by trait label (prompts.parquet), then by key: blocks show in heatmaps."""
    labels = dict(zip(run.extra["prompts"]["prompt_key"], run.extra["prompts"]["label"])) if "prompts" in run.extra else {}
    return sorted(set(keys), key=lambda k: (labels.get(k, ""), k))


def _prompt_labels(run: Run) -> pl.DataFrame:
    if "prompts" in run.extra:
        return run.extra["prompts"].select(pl.col("prompt_key").alias("prompt"), pl.col("label").alias("group"))
    return pl.DataFrame(schema={"prompt": pl.String, "group": pl.String})


def _prompt_suppression(run: Run) -> pl.DataFrame | None:
    """(prompt, mode, suppression): the heuristics stage's suppression input, else this run's IP trials."""
    if "suppression" in run.extra:
        return run.extra["suppression"].select(pl.col("prompt_key").alias("prompt"), pl.col("prefix_type").alias("mode"),
                                               pl.col("suppression").cast(pl.Float64))
    if run.scores is None or not _control_pairs(run):
        return None
    try:
        scores = _effect_scores(run)
    except Skip:
        return None
    s = A.at_final_step(A.suppression(scores, run.trials)).filter(pl.col("prompt") != "")
    return s.group_by("prompt", "mode").agg(suppression=pl.col("mean").mean()) if s.height else None


def chart_embeddings(run: Run):
    """Points: each prompt's PCA / SVD coordinates of its point-wise W row, coloured by suppression."""
    alt = _alt()
    h = _need(run.heuristics, "heuristics.parquet")
    evr = {m: v for k, m, v in h.iter_rows() if k == ""}
    coords: dict[tuple[str, str, str], dict[str, float]] = {}
    for key, metric, value in h.iter_rows():
        m = _EMBEDDING.match(metric)
        if key and m:
            coords.setdefault((m[1], m[2], key), {})[f"c{m[3]}"] = value
    rows = []
    for (method, variant, key), c in coords.items():
        if {"c1", "c2"} <= set(c):
            e1, e2 = (evr.get(f"{method}_point_{variant}_evr{j}", math.nan) for j in (1, 2))
            panel = f"{_METHOD[method]} of W_{variant}: explained variance {e1:.0%} + {e2:.0%}"
            rows.append({"prompt": key, "mode": variant, "panel": panel, "c1": c["c1"], "c2": c["c2"]})
    if not rows:
        raise Skip("heuristics.parquet has no PCA/SVD coordinates (metric family 'decomposition')")
    df = pl.DataFrame(rows).join(_prompt_labels(run), on="prompt", how="left").with_columns(pl.col("group").fill_null(""))
    effects = _prompt_suppression(run)
    coloured = effects is not None
    df = df.join(effects, on=["prompt", "mode"], how="left") if coloured else df.with_columns(suppression=pl.lit(None, pl.Float64))
    df = _clean(df)
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
        .properties(title=_title(f"{run.name}: prompt embeddings from the point-wise W matrices", note,
                                 "one point per prompt (its row of W: logprob shifts over training examples)"))
    )


def chart_angles(run: Run):
    """Heatmaps: pairwise angles between prompts in raw W and its 2-D PCA / SVD coordinates."""
    alt = _alt()
    a = _need(run.extra.get("angles"), "angles.parquet (the heuristics stage)").filter(pl.col("granularity") == "point")
    if not a.height:
        raise Skip("angles.parquet has no point-wise angles")
    order = _prompt_order(run, a["prompt_a"].to_list())
    df = _clean(a.filter(pl.col("prompt_a") != pl.col("prompt_b")))
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
        .properties(title=_title(f"{run.name}: pairwise angles between prompts (point-wise W rows)",
                                 "arccos of the cosine between two prompts' vectors; prompts grouped by trait"))
    )


def _sweep_name(condition: str) -> str:
    return condition.split("@", 1)[0]


def chart_grad_cosine(run: Run):
    """Scatter: per sequence and layer, cos(dL/dh, vector) with a defense vs without it, identity line."""
    alt = _alt()
    g = _need(run.extra.get("mech/grad_cosine"), "mech/grad_cosine.parquet (python -m raysweep.mech)")
    keys = ["model", "sequence_id", "layer", "vector"]
    off = g.filter(pl.col("condition") == "none").select(*keys, pl.col("cosine").alias("off"))
    if not off.height:
        raise Skip("needs the defenseless condition 'none' in mech.conditions")
    df = _clean(g.filter(pl.col("condition") != "none").join(off, on=keys)
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
        .properties(title=_title(
            f"{run.name}: activation-gradient cosine with and without the defense",
            "one point per sequence and layer: token-averaged cosine between the loss gradient at the layer "
            "output and the vector; dashed line = no change"))
    )


def chart_intensity(run: Run):
    """Lines: loss and gradient cosine against the steering coefficient, IP on and off, 95% CI over sequences."""
    alt = _alt()
    loss = _need(run.extra.get("mech/loss"), "mech/loss.parquet (python -m raysweep.mech)")
    cos = _need(run.extra.get("mech/grad_cosine"), "mech/grad_cosine.parquet (python -m raysweep.mech)")
    swept = {_sweep_name(c) for c in loss.filter(pl.col("coef").is_not_nan())["condition"]
             if c != _sweep_name(c)}  # conditions run at several coefficients (name@coef)
    if not swept:
        raise Skip("needs a steering condition with coefs (a coefficient sweep)")

    def curves(df: pl.DataFrame, value: str, by: list[str]) -> pl.DataFrame:
        df = df.with_columns(sweep=pl.col("condition").map_elements(_sweep_name, return_dtype=pl.String))
        df = df.filter(pl.col("sweep").is_in(sorted(swept)))
        out = df.group_by("sweep", "ip", "coef", *by).agg(A.ci_agg(value)).sort("sweep", "coef")
        return _clean(A.with_bounds(out).with_columns(
            defense=pl.col("sweep") + pl.when(pl.col("ip") != "").then(pl.lit(" (IP on)")).otherwise(pl.lit(" (IP off)"))))

    def panel(y_title: str) -> list:
        base = alt.Chart().encode(x=alt.X("coef:Q", title="steering coefficient"),
                                  color=alt.Color("defense:N", title="sweep"))
        tip = ["defense:N", "coef:Q", alt.Tooltip("mean:Q", format=".4f"), alt.Tooltip("ci:Q", format=".4f"), "n:Q"]
        return [base.mark_area(opacity=0.15).encode(y="lo:Q", y2="hi:Q"),
                base.mark_line(point=True).encode(y=alt.Y("mean:Q", title=y_title, scale=alt.Scale(zero=False)),
                                                  tooltip=tip)]

    lines = curves(loss, "loss", [])
    cosines = curves(cos, "cosine", ["layer", "vector"]).with_columns(pl.col("layer").cast(pl.String))
    left = alt.layer(*panel("loss (mean CE over assistant tokens, 95% CI band)"), data=lines).properties(
        width=300, height=240, title="loss")
    right = (alt.layer(*panel("cos(dL/dh, vector) (mean, 95% CI band)")).properties(width=220, height=200)
             .facet(row=alt.Row("layer:N", title="layer"), column=alt.Column("vector:N", title="vector"), data=cosines)
             .properties(title="gradient cosine"))
    return alt.hconcat(left, right).properties(title=_title(
        f"{run.name}: steering intensity sweep", "loss and activation-gradient cosine against the coefficient, "
        "with the inoculation prompt in the pass (IP on) and without; 95% CI over sequences"))


def _behaviour(run: Run) -> pl.DataFrame:
    if "start" not in run.trials.columns or not (run.trials["start"] != "").any():
        raise Skip("no trial starts from a pre-finetuned model (model.start / `starts`)")
    m = A.behaviour_matrix(_effect_scores(run), run.trials)
    if not m.height:
        raise Skip("no scored trials")
    return m.with_columns(start=pl.when(pl.col("start") == "").then(pl.lit("base")).otherwise(pl.col("start")))


def _start_order(run: Run) -> list[str]:
    """Starting models in the order of the experiment's trials, the base model as "base"."""
    return [s or "base" for s in dict.fromkeys(run.trials["start"].to_list())]


def _matrix(alt, df: pl.DataFrame, value: str, title: str, scheme: str, domain: list[float] | None, columns: list[str],
            rows: list[str]):
    enc = {"x": alt.X("post:N", sort=columns, title="post-finetuning data"),
           "y": alt.Y("start:N", sort=rows, title="starting model (pre-finetuning data)")}
    scale = alt.Scale(scheme=scheme, domain=domain) if domain else alt.Scale(scheme=scheme)
    rect = alt.Chart().mark_rect().encode(**enc, color=alt.Color(f"{value}:Q", title=title, scale=scale),
                                         tooltip=["method:N", "start:N", "post:N", alt.Tooltip(f"{value}:Q", format=".1f")])
    text = alt.Chart().mark_text(fontSize=10).encode(**enc, text=alt.Text(f"{value}:Q", format=".1f"))
    return alt.layer(rect, text, data=_clean(df)).properties(width=alt.Step(48), height=alt.Step(28))


def chart_behaviour_matrix(run: Run):
    """001 Fig. 2a: final trait score per (starting model, post-finetuning data), one panel per method;
    the "(none)" column is each starting model before post-finetuning (step 0)."""
    alt = _alt()
    m = _behaviour(run)
    none_col = (m.group_by("method", "start", "trait").agg(pl.col("start_mean").mean().alias("mean"))
                .with_columns(post=pl.lit("(none)")))
    df = pl.concat([m.select("method", "start", "post", "trait", "mean"), none_col.select("method", "start", "post", "trait", "mean")])
    cols = ["(none)", *dict.fromkeys(m["post"].to_list())]
    return (
        _matrix(alt, df, "mean", "trait score", "reds", [0.0, 100.0], cols, _start_order(run))
        .facet(column=alt.Column("method:N", title="post-finetuning method"), row=alt.Row("trait:N"))
        .properties(title=_title(f"{run.name}: behaviour matrix (seed 001 Fig. 2a)",
                                 "trait score at the final step; (none) = the starting model itself (step 0)"))
    )


def chart_behaviour_vs_none(run: Run):
    """001 Fig. 2b: paired (method - no-defense post-finetuning) from the same start on the same data."""
    alt = _alt()
    m = _behaviour(run).filter(pl.col("vs_none").is_not_null())
    if not m.height:
        raise Skip("no defended trial has a no-defense control at its start and data")
    lim = max(1.0, float(m["vs_none"].abs().max()))
    return (
        _matrix(alt, m, "vs_none", "score − no defense", "redblue", [lim, -lim], list(dict.fromkeys(m["post"].to_list())),
                _start_order(run))
        .facet(column=alt.Column("method:N", title="post-finetuning method"), row=alt.Row("trait:N"))
        .properties(title=_title(f"{run.name}: defense effect per start and data (seed 001 Fig. 2b)",
                                 "paired (method − no defense) at the final step over shared questions; negative = less trait",
                                 CI_NOTE))
    )


CHARTS: list[tuple[str, str, Callable]] = [
    ("final_scores", "Trait score at the final step", chart_final_scores),
    ("suppression", "Suppression vs the controls", chart_suppression),
    ("elicitation_vs_suppression", "Elicitation at step 0 vs suppression", chart_elicitation_vs_suppression),
    ("fixed_vs_mix", "Fixed-vs-mix gap", chart_fixed_vs_mix),
    ("score_curves", "Trait score over training", chart_score_curves),
    ("losses", "Training loss", chart_losses),
    ("heldout_logprob", "Held-out logprob over training", chart_heldout),
    ("em_rate", "Emergent-misalignment rate", chart_em),
    ("heuristics", "Heuristics vs suppression", chart_heuristics),
    ("embeddings", "Prompt embeddings (PCA / SVD of W)", chart_embeddings),
    ("angles", "Angles between prompts", chart_angles),
    ("grad_cosine", "Activation-gradient cosine, defense on vs off", chart_grad_cosine),
    ("intensity", "Steering intensity sweep", chart_intensity),
    ("behaviour_matrix", "Behaviour matrix: starting model x post-finetuning data", chart_behaviour_matrix),
    ("behaviour_vs_none", "Behaviour matrix: effect vs no defense", chart_behaviour_vs_none),
]


# --- summary tables ------------------------------------------------------------------


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
    scores = _need(run.scores, "scores.parquet")
    ts = A.at_final_step(A.trait_scores(scores, run.trials))
    out = _in_trial_order(run, ts.select("trial_id", "label", "trait", "step").unique(), "trait")
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
    df = A.fixed_vs_mix_gap(_effect_scores(run), run.trials)
    if not df.height:
        raise Skip("no fixed/mix pairs")
    df = _gap_labels(run, df.filter(pl.col("step") == pl.col("step").max().over("fixed_id", "mix_id")))
    return df.select("label", "placement", "trait", "step",
                     pl.struct("mean", "ci").map_elements(lambda r: _fmt(r["mean"], r["ci"]), return_dtype=pl.String)
                     .alias("fixed − mix (default)"), "n")


def table_em(run: Run) -> pl.DataFrame:
    scores = _need(run.scores, "scores.parquet")
    if not (A.has_traits(scores, "coherence") and (A.has_traits(scores, "aligned") or A.has_traits(scores, "alignment"))):
        raise Skip("no EM traits")
    df = _in_trial_order(run, A.at_final_step(A.em_rate(scores, trials=run.trials)), "condition")
    return df.select("label", "condition", "step", pl.struct("mean", "ci").map_elements(
        lambda r: _fmt(100 * r["mean"], None if r["ci"] is None else 100 * r["ci"]), return_dtype=pl.String)
        .alias("EM rate (%)"), "n")


def table_fits(run: Run) -> pl.DataFrame:
    """Pearson r, Spearman rho, n and RMSE of elicitation (and each heuristic) vs suppression."""
    scores = _effect_scores(run)
    if not _control_pairs(run):
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


def table_seeds(run: Run) -> pl.DataFrame:
    if not A.has_axis(run.trials, "seed"):
        raise Skip("no seed axis")
    ts = A.at_final_step(A.trait_scores(_need(run.scores, "scores.parquet"), run.trials))
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
    ("Across seeds", "final-step score averaged over the seeds of otherwise identical trials; CI over seeds",
     table_seeds),
]


# --- HTML ----------------------------------------------------------------------------

PAGE_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; max-width: 1400px; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 13px; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: left; }
th { background: #f3f3f3; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
figure { margin: 1.5em 0 2.5em; }
figcaption { font-size: 13px; color: #555; }
.note { color: #8a5a00; }
"""


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


def _spec_js(spec: dict) -> str:
    return json.dumps(spec).replace("</", "<\\/")  # a spec must not close the <script> it sits in


def chart_page(title: str, spec: dict) -> str:
    return f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>{html.escape(title)}</title><script src="{BUNDLE}"></script></head>
<body><div id="chart"></div>
<script>vegaEmbed("#chart", {_spec_js(spec)}, {{"actions": false}}).catch(console.error);</script>
</body></html>
"""


def index_page(run: Run, tables: list[tuple[str, str, str]], charts: list[tuple[str, str, dict]], notes: list[str]) -> str:
    parts = [f"<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>raysweep report: {html.escape(run.name)}</title>",
             f"<style>{PAGE_CSS}</style><script src='{BUNDLE}'></script></head><body>",
             f"<h1>raysweep report: {html.escape(run.name)}</h1>"]
    if run.description:
        parts.append(f"<p>{html.escape(run.description)}</p>")
    prompts = run.trials["default_system_prompt"].drop_nulls() if "default_system_prompt" in run.trials.columns else []
    sysp = prompts[0] if len(prompts) else None
    parts.append("<p>Default condition = the model's template default" +
                 (f" (system prompt: <q>{html.escape(sysp)}</q>)" if sysp else "") + f". {html.escape(CI_NOTE)}.</p>")
    if notes:
        parts.append("<h2>Notes</h2><ul>" + "".join(f"<li class=note>{html.escape(n)}</li>" for n in notes) + "</ul>")
    parts.append("<h2>Summary tables</h2>")
    for title, caption, body in tables:
        parts.append(f"<h3>{html.escape(title)}</h3>" + (f"<p>{html.escape(caption)}</p>" if caption else "") + body)
    parts.append("<h2>Charts</h2>")
    for name, title, _ in charts:
        parts.append(f"<figure><figcaption>{html.escape(title)} — <a href='{name}.png'>PNG</a> · "
                     f"<a href='{name}.html'>HTML</a></figcaption><div id='{name}'></div></figure>")
    embeds = "\n".join(f"vegaEmbed('#{name}', {_spec_js(spec)}, {{'actions': false}}).catch(console.error);"
                       for name, _, spec in charts)
    parts.append(f"<script>\n{embeds}\n</script></body></html>\n")
    return "\n".join(parts)


def _vl_version() -> str:
    """The Vega-Lite version Altair writes, as vl-convert names it (e.g. v6.4)."""
    import altair as alt

    return "v" + ".".join(alt.VEGALITE_VERSION.split(".")[:2])


def write_bundle(out: Path) -> None:
    """vl-convert's bundle of Vega, Vega-Lite (the version Altair writes) and Vega-Embed.

    Bundling takes ~5 s, so it is kept in the raysweep cache, keyed by both versions.
    """
    import vl_convert as vlc

    from ..train.models import cache_dir
    from ..tables import write_text

    vl = _vl_version()
    cached = cache_dir() / "vega" / f"vega-bundle-vlc{getattr(vlc, '__version__', 'x')}-{vl}.js"
    if not cached.is_file():
        write_text(cached, vlc.javascript_bundle(vl_version=vl))
    write_text(out / BUNDLE, cached.read_text())


def build_report(exp_dir: Path, png: bool = True) -> tuple[Path, list[str]]:
    """Write `exp_dir/report/`; returns (index path, failures). Charts without their tables are noted, not fatal.

    png=False skips the PNG export (about 1 s a chart); the HTML pages are always written.
    """
    import vl_convert as vlc

    from ..tables import atomic_write_bytes, write_text

    run = load_run(exp_dir)
    out = exp_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    notes, failures, tables, charts = [], [], [], []
    for title, caption, build in TABLE_BUILDERS:
        try:
            tables.append((title, caption, html_table(build(run))))
        except Skip:
            continue  # an absent table needs no note: the charts' notes say what is missing
        except Exception as exc:  # a bug in one table must not cost the rest of the report
            failures.append(f"table '{title}' failed: {exc!r}")
            traceback.print_exc()
    for name, title, build in CHARTS:
        try:
            spec = build(run).to_dict()
            if png:
                atomic_write_bytes(out / f"{name}.png", vlc.vegalite_to_png(spec, scale=2, vl_version=_vl_version()))
        except Skip as why:
            notes.append(f"{title}: skipped — {why}")
            continue
        except Exception as exc:  # as for tables: report the failure, keep the other charts
            failures.append(f"chart '{name}' failed: {exc!r}")
            traceback.print_exc()
            continue
        write_text(out / f"{name}.html", chart_page(f"{run.name}: {title}", spec))
        charts.append((name, title, spec))
    for name, _, _ in CHARTS:  # a chart this run no longer supports must not survive from an earlier report
        if name not in {c[0] for c in charts}:
            for stale in (out / f"{name}.png", out / f"{name}.html"):
                stale.unlink(missing_ok=True)
    notes += failures
    write_bundle(out)
    write_text(out / "index.html", index_page(run, tables, charts, notes))
    return out / "index.html", failures


def parse_args(argv: list[str]) -> dict[str, str]:
    args = {"storage": "runs"}
    for a in argv:
        key, eq, value = a.partition("=")
        if not eq or key not in ("exp", "storage") or not value:
            raise ReportError(f"unknown argument {a!r}\n{USAGE}")
        args[key] = value
    if "exp" not in args:
        raise ReportError(f"name the experiment with exp=NAME\n{USAGE}")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        args = parse_args(argv)
        index, failures = build_report(Path(args["storage"]) / args["exp"])
    except ReportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"report: {index}")
    for f in failures:
        print(f"error: {f}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
