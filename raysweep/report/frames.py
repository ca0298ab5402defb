"""The report's own reshaping of a run's tables: what the charts and tables draw.

Every statistic (means, CIs, paired effects, fits) comes from `raysweep.analysis`; what is
here is specific to the report: which scores a chart uses, how trials and prompts are
named and ordered, and decoding the tables of the other stages: the heuristics stage's
embedding coordinates (packed into metric names such as `pca_point_fixed_pc1`), its prompt
labels and suppression input, and the mech stage's coefficient sweeps (`name@coef`).
"""

from __future__ import annotations

import math
import re

import polars as pl

from .. import analysis as A
from .load import Run, Skip

CI_NOTE = "95% CI = mean ± 1.96 × std(ddof=1)/√n over questions (samples of a question averaged first)"
EM_TRAITS = ("coherence", "aligned", "alignment")  # judged for the EM rate, not traits to suppress
# heuristics.parquet: a prompt's 2-D coordinates are metrics `<pca|svd>_point_<variant>_<pc|sv><1|2>`;
# the explained variance is `<method>_point_<variant>_evr<j>` under the empty prompt key.
EMBEDDING = re.compile(r"^(pca|svd)_point_(.+)_(?:pc|sv)([12])$")
METHOD = {"pca": "PCA (mean-centred)", "svd": "TruncatedSVD (uncentred)"}


def need(df: pl.DataFrame | None, what: str) -> pl.DataFrame:
    if df is None:
        raise Skip(f"needs {what}, which this run does not have")
    return df


def effect_scores(run: Run) -> pl.DataFrame:
    """Scores of the traits a defense should suppress: the EM judges' traits are left to the EM chart."""
    scores = need(run.scores, "scores.parquet").filter(~pl.col("trait").is_in(EM_TRAITS))
    if not scores.height:
        raise Skip("the scores hold only the EM judges' traits (see the EM chart)")
    return scores


def control_pairs(run: Run) -> bool:
    t = run.trials
    return bool(t.filter((pl.col("control_id") != "") & (pl.col("control_id") != pl.col("trial_id"))).height)


def has_em(scores: pl.DataFrame) -> bool:
    """The EM rate's traits: coherence and aligned (or alignment)."""
    return A.has_traits(scores, "coherence") and (A.has_traits(scores, "aligned") or A.has_traits(scores, "alignment"))


def final_note(df: pl.DataFrame) -> str:
    steps = sorted(set(df["step"].to_list()))
    return f"step {steps[0]}" if len(steps) == 1 else "the last evaluated step of each trial"


def gap_labels(run: Run, gap: pl.DataFrame) -> pl.DataFrame:
    """Name a fixed/mix pair by its fixed trial's label without the mode: "p/fixed[seed=0]" -> "p[seed=0]"."""
    names = run.trials.select(fixed_id="trial_id", label=pl.col("label").str.replace("/fixed", "", literal=True))
    return gap.join(names, on="fixed_id", how="left", maintain_order="left").sort("label", maintain_order=True)


def final_gap(run: Run, gap: pl.DataFrame) -> pl.DataFrame:
    """The fixed/mix gaps at each pair's last step, named as gap_labels does."""
    return gap_labels(run, gap.filter(pl.col("step") == pl.col("step").max().over("fixed_id", "mix_id")))


def in_trial_order(run: Run, df: pl.DataFrame, *then: str) -> pl.DataFrame:
    """Rows sorted as the trials are listed (control first), then by `then`."""
    order = run.trials.select("trial_id", _order=pl.int_range(pl.len()))
    return df.join(order, on="trial_id", how="left").sort("_order", *then).drop("_order")


# --- the heuristics stage's tables ------------------------------------------------------


def prompt_order(run: Run, keys: list[str]) -> list[str]:
    """Prompts grouped by trait label (prompts.parquet), then by key: blocks show in heatmaps."""
    labels = dict(zip(run.extra["prompts"]["prompt_key"], run.extra["prompts"]["label"])) if "prompts" in run.extra else {}
    return sorted(set(keys), key=lambda k: (labels.get(k, ""), k))


def prompt_labels(run: Run) -> pl.DataFrame:
    if "prompts" in run.extra:
        return run.extra["prompts"].select(pl.col("prompt_key").alias("prompt"), pl.col("label").alias("group"))
    return pl.DataFrame(schema={"prompt": pl.String, "group": pl.String})


def prompt_suppression(run: Run) -> pl.DataFrame | None:
    """(prompt, mode, suppression): the heuristics stage's suppression input, else this run's IP trials."""
    if "suppression" in run.extra:
        return run.extra["suppression"].select(pl.col("prompt_key").alias("prompt"), pl.col("prefix_type").alias("mode"),
                                               pl.col("suppression").cast(pl.Float64))
    if run.scores is None or not control_pairs(run):
        return None
    try:
        scores = effect_scores(run)
    except Skip:
        return None
    s = A.at_final_step(A.suppression(scores, run.trials)).filter(pl.col("prompt") != "")
    return s.group_by("prompt", "mode").agg(suppression=pl.col("mean").mean()) if s.height else None


def embedding_points(heuristics: pl.DataFrame) -> pl.DataFrame:
    """(prompt, mode, panel, c1, c2): each prompt's 2-D PCA / SVD coordinates decoded from the metric names."""
    evr = {m: v for k, m, v in heuristics.iter_rows() if k == ""}
    coords: dict[tuple[str, str, str], dict[str, float]] = {}
    for key, metric, value in heuristics.iter_rows():
        m = EMBEDDING.match(metric)
        if key and m:
            coords.setdefault((m[1], m[2], key), {})[f"c{m[3]}"] = value
    rows = []
    for (method, variant, key), c in coords.items():
        if {"c1", "c2"} <= set(c):
            e1, e2 = (evr.get(f"{method}_point_{variant}_evr{j}", math.nan) for j in (1, 2))
            panel = f"{METHOD[method]} of W_{variant}: explained variance {e1:.0%} + {e2:.0%}"
            rows.append({"prompt": key, "mode": variant, "panel": panel, "c1": c["c1"], "c2": c["c2"]})
    if not rows:
        raise Skip("heuristics.parquet has no PCA/SVD coordinates (metric family 'decomposition')")
    return pl.DataFrame(rows)


# --- the mech stage's tables ------------------------------------------------------------


def sweep_name(condition: str) -> str:
    """A coefficient sweep's condition `name@coef` -> `name`."""
    return condition.split("@", 1)[0]


def swept_conditions(loss: pl.DataFrame) -> set[str]:
    """The conditions run at several coefficients (named name@coef)."""
    return {sweep_name(c) for c in loss.filter(pl.col("coef").is_not_nan())["condition"] if c != sweep_name(c)}


def sweep_curves(df: pl.DataFrame, value: str, by: list[str], swept: set[str]) -> pl.DataFrame:
    """Mean and 95% CI of `value` over sequences per sweep, IP on/off and coefficient (and `by`)."""
    df = df.with_columns(sweep=pl.col("condition").map_elements(sweep_name, return_dtype=pl.String))
    df = df.filter(pl.col("sweep").is_in(sorted(swept)))
    out = df.group_by("sweep", "ip", "coef", *by).agg(A.ci_agg(value)).sort("sweep", "coef")
    return A.with_bounds(out).with_columns(
        defense=pl.col("sweep") + pl.when(pl.col("ip") != "").then(pl.lit(" (IP on)")).otherwise(pl.lit(" (IP off)")))


# --- starting models (seed 001's behaviour matrix) ---------------------------------------


def behaviour(run: Run) -> pl.DataFrame:
    """analysis.behaviour_matrix of the run, the base model's start named "base"."""
    if "start" not in run.trials.columns or not (run.trials["start"] != "").any():
        raise Skip("no trial starts from a pre-finetuned model (model.start / `starts`)")
    m = A.behaviour_matrix(effect_scores(run), run.trials)
    if not m.height:
        raise Skip("no scored trials")
    return m.with_columns(start=pl.when(pl.col("start") == "").then(pl.lit("base")).otherwise(pl.col("start")))


def start_order(run: Run) -> list[str]:
    """Starting models in the order of the experiment's trials, the base model as "base"."""
    return [s or "base" for s in dict.fromkeys(run.trials["start"].to_list())]


def prediction_frames(run: Run) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(analysis.prediction, analysis.prediction_fit) of a selecting sweep, or Skip: what the
    predicted-vs-observed chart and table draw."""
    sel = need(run.extra.get("selection"), "selection.parquet (a sweep with sweep.select)")
    if not control_pairs(run):
        raise Skip("needs a no-defense control trial (trials.parquet control_id)")
    pred = A.prediction(sel, run.trials, effect_scores(run))
    fits = A.prediction_fit(pred)
    if not fits.height:
        raise Skip("no selected prompt has a suppression yet (no finished IP trial paired with the control)")
    return pred, fits
