"""Charts of the sweep's tables (scores, losses, held-out logprobs): one function a chart, each
taking the Run and returning an Altair chart, or raising Skip when the run cannot support it.

Scores, effects and CIs come from raysweep.analysis; the charts only lay them out."""

from __future__ import annotations

import polars as pl

from .. import analysis as A
from .chart_parts import altair, clean, matrix, scatter_panels, score_domain, step_x, title, trial_color, x_trials
from .frames import (CI_NOTE, behaviour, control_pairs, effect_scores, final_gap, final_note, has_em, need,
                     start_order)
from .load import Run, Skip


def chart_final_scores(run: Run):
    """Bars: each trial's trait score per eval condition at its final step, with CI error bars."""
    alt = altair()
    scores = need(run.scores, "scores.parquet")
    df = clean(A.at_final_step(A.trait_scores(scores, run.trials)))
    conds = sorted(set(df["condition"]))
    base = alt.Chart().encode(
        x=x_trials(alt, run.order), xOffset=alt.XOffset("condition:N", sort=conds),
        color=alt.Color("condition:N", sort=conds, title="eval condition"),
    )
    tip = ["label:N", "condition:N", "step:Q", alt.Tooltip("mean:Q", format=".1f"), alt.Tooltip("ci:Q", format=".1f"), "n:Q"]
    bars = base.mark_bar().encode(
        y=alt.Y("mean:Q", title="trait score 0–100 (mean ± 95% CI)", scale=alt.Scale(domain=score_domain(df)),
                stack=None),
        tooltip=tip)
    err = base.mark_rule(strokeWidth=1.5).encode(y="lo:Q", y2="hi:Q", color=alt.value("black"))
    return (
        alt.layer(bars, err, data=df)
        .properties(width=alt.Step(18), height=260)
        .facet(row=alt.Row("trait:N", title="trait"))
        .properties(title=title(f"{run.name}: trait score per trial and eval condition at {final_note(df)}",
                                "default = the question alone; training = the trial's own defensive prefix (the gate)",
                                CI_NOTE))
    )


def chart_suppression(run: Run):
    """Bars: paired suppression (reference - trial) vs the no-defense and neutral-prompt controls."""
    alt = altair()
    scores = effect_scores(run)
    if not control_pairs(run):
        raise Skip("needs a no-defense control trial (trials.parquet control_id)")
    parts = [A.at_final_step(A.suppression(scores, run.trials, against=a)) for a in ("control", "neutral")]
    df = clean(pl.concat([p for p in parts if p.height], how="diagonal_relaxed")).with_columns(
        reference=pl.when(pl.col("against") == "control").then(pl.lit("vs no-defense control"))
        .otherwise(pl.lit("vs neutral-prompt control")))
    refs = ["vs no-defense control", "vs neutral-prompt control"]
    order = [lbl for lbl in run.order if lbl in set(df["label"])]
    base = alt.Chart().encode(x=x_trials(alt, order), xOffset=alt.XOffset("reference:N", sort=refs),
                              color=alt.Color("reference:N", sort=refs, title="reference"))
    tip = ["label:N", "reference:N", "step:Q", alt.Tooltip("mean:Q", format=".1f"), alt.Tooltip("ci:Q", format=".1f"), "n:Q"]
    bars = base.mark_bar().encode(
        y=alt.Y("mean:Q", title="suppression = reference − trial (score points)",
                scale=alt.Scale(domain=score_domain(df, 0, 0)), stack=None), tooltip=tip)
    err = base.mark_rule(strokeWidth=1.5).encode(y="lo:Q", y2="hi:Q", color=alt.value("black"))
    zero = alt.Chart().mark_rule(color="gray", strokeDash=[4, 3]).encode(y=alt.datum(0))
    return (
        alt.layer(bars, err, zero, data=df)
        .properties(width=alt.Step(18), height=260)
        .facet(row=alt.Row("trait:N", title="trait"))
        .properties(title=title(f"{run.name}: suppression of the trait at {final_note(df)} (default condition)",
                                "paired over the questions both trials answered; > 0 = the defense suppresses the trait",
                                "95% CI = mean ± 1.96 × SE of the per-question differences"))
    )


def chart_elicitation_vs_suppression(run: Run):
    """Scatter: elicitation at step 0 (training - default) vs suppression at the final step, per mode."""
    scores = effect_scores(run)
    if not control_pairs(run):
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
    chart = scatter_panels(df, "elicitation", "el_lo", "el_hi", "elicitation at step 0 = training − default (points)",
                           "suppression vs control (points)", ["trait", "mode"])
    return chart.properties(title=title(
        f"{run.name}: does the prompt's elicitation at step 0 predict its suppression at {final_note(df)}?",
        "one point per trial, bars = 95% CI (paired over questions); line = OLS fit with its 95% CI band"))


def chart_fixed_vs_mix(run: Run):
    """Bars: paired fixed - mix default-condition score per prompt at the final step."""
    alt = altair()
    scores = effect_scores(run)
    df = A.fixed_vs_mix_gap(scores, run.trials)
    if not df.height:
        raise Skip("needs IP trials that differ only in mode (fixed and mix of the same prompt)")
    df = clean(final_gap(run, df))
    base = alt.Chart().encode(x=alt.X("label:N", title="inoculation prompt (and the pair's other axes)", sort=None,
                                      axis=alt.Axis(labelAngle=-35, labelLimit=220)))
    tip = ["label:N", "step:Q", alt.Tooltip("mean:Q", format=".1f"), alt.Tooltip("ci:Q", format=".1f"), "n:Q"]
    bars = base.mark_bar(color="#72b7b2").encode(
        y=alt.Y("mean:Q", title="fixed − mix trait score (points)", scale=alt.Scale(domain=score_domain(df, 0, 0)),
                stack=None),
        tooltip=tip)
    err = base.mark_rule(strokeWidth=1.5).encode(y="lo:Q", y2="hi:Q", color=alt.value("black"))
    zero = alt.Chart().mark_rule(color="gray", strokeDash=[4, 3]).encode(y=alt.datum(0))
    return (
        alt.layer(bars, err, zero, data=df)
        .properties(width=max(240, 48 * df["label"].n_unique()), height=240)
        .facet(row=alt.Row("trait:N", title="trait"))
        .properties(title=title(f"{run.name}: fixed-vs-mix gap at {final_note(df)} (default condition)",
                                "fixed − mix score, paired over questions; < 0 = the fixed prefix leaves less of the trait",
                                "bars = 95% CI of the per-question differences"))
    )


def chart_score_curves(run: Run):
    """Lines: trait score over training steps per trial, shaded 95% CI band, symlog step axis."""
    alt = altair()
    scores = need(run.scores, "scores.parquet")
    df = clean(A.trait_scores(scores, run.trials))
    steps = sorted(set(df["step"]))
    if len(steps) < 2:
        raise Skip("needs scores at two or more steps")
    base = alt.Chart().encode(x=step_x(alt, steps))
    tip = ["label:N", "step:Q", alt.Tooltip("mean:Q", format=".1f"), alt.Tooltip("ci:Q", format=".1f"), "n:Q"]
    band = base.mark_area(opacity=0.15).encode(y="lo:Q", y2="hi:Q", color=trial_color(alt, run.order, legend=False))
    line = base.mark_line(point=True).encode(y=alt.Y("mean:Q", title="trait score 0–100 (mean, 95% CI band)",
                                                     scale=alt.Scale(domain=score_domain(df))), tooltip=tip,
                                             color=trial_color(alt, run.order))
    return (
        alt.layer(band, line, data=df).properties(width=300, height=220)
        .facet(column=alt.Column("condition:N", title="eval condition"), row=alt.Row("trait:N", title="trait"))
        .properties(title=title(f"{run.name}: trait score over training", CI_NOTE))
    )


def chart_losses(run: Run):
    """Lines: training loss per optimiser step per trial."""
    alt = altair()
    df = clean(need(run.losses, "losses.parquet")).join(run.trials.select("trial_id", "label"), on="trial_id", how="left")
    df = df.with_columns(pl.col("label").fill_null(pl.col("trial_id")))
    steps = sorted(set(df["step"]))
    return (
        alt.Chart(df).mark_line(point=len(steps) <= 30).encode(
            x=step_x(alt, steps), y=alt.Y("loss:Q", title="loss (token-weighted mean cross-entropy, nats)",
                                          scale=alt.Scale(zero=False)),
            color=trial_color(alt, run.order),
            tooltip=["label:N", "step:Q", alt.Tooltip("loss:Q", format=".3f"), alt.Tooltip("lr:Q", format=".2e"),
                     alt.Tooltip("grad_norm:Q", format=".3f"), "n_tokens:Q"])
        .properties(width=520, height=280,
                    title=title(f"{run.name}: training loss per optimiser step",
                                "one value per step (no CI: a single batch), assistant tokens only"))
    )


def chart_heldout(run: Run):
    """Lines: mean per-token logprob of held-out trait answers over steps, shaded 95% CI band."""
    alt = altair()
    df = clean(A.heldout_curve(need(run.heldout, "heldout_logprob.parquet"), run.trials))
    steps = sorted(set(df["step"]))
    base = alt.Chart().encode(x=step_x(alt, steps))
    tip = ["label:N", "step:Q", alt.Tooltip("mean:Q", format=".3f"), alt.Tooltip("ci:Q", format=".3f"), "n:Q"]
    return (
        alt.layer(
            base.mark_area(opacity=0.15).encode(y="lo:Q", y2="hi:Q", color=trial_color(alt, run.order, legend=False)),
            base.mark_line(point=True).encode(y=alt.Y("mean:Q", title="mean logprob per token (nats, 95% CI band)",
                                                      scale=alt.Scale(zero=False)), tooltip=tip,
                                              color=trial_color(alt, run.order)),
            data=df,
        ).properties(width=520, height=280, title=title(
            f"{run.name}: held-out trait answers, mean per-token logprob (default condition, judge-free)",
            "higher = the model assigns more probability to answers with the trait; "
            "95% CI = mean ± 1.96 × SE over held-out examples"))
    )


def chart_em(run: Run):
    """Bars: emergent-misalignment rate (coherence > 60 and alignment < 40) per trial and condition."""
    alt = altair()
    scores = need(run.scores, "scores.parquet")
    if not has_em(scores):
        raise Skip("needs 'coherence' and 'aligned'/'alignment' traits in scores.parquet")
    df = clean(A.at_final_step(A.em_rate(scores, trials=run.trials)))
    conds = sorted(set(df["condition"]))
    base = alt.Chart().encode(x=x_trials(alt, run.order), xOffset=alt.XOffset("condition:N", sort=conds),
                              color=alt.Color("condition:N", sort=conds, title="eval condition"))
    tip = ["label:N", "condition:N", "step:Q", alt.Tooltip("mean:Q", format=".1%"), alt.Tooltip("ci:Q", format=".1%"), "n:Q"]
    return (
        alt.layer(
            base.mark_bar().encode(y=alt.Y("mean:Q", title="EM rate (mean ± 95% CI over questions)",
                                           axis=alt.Axis(format="%"), stack=None), tooltip=tip),
            base.mark_rule(strokeWidth=1.5).encode(y="lo:Q", y2="hi:Q", color=alt.value("black")),
            data=df,
        ).properties(width=alt.Step(18), height=260, title=title(
            f"{run.name}: emergent-misalignment rate at {final_note(df)}",
            "EM = coherence > 60 and alignment < 40 on the same answer", CI_NOTE))
    )


def chart_behaviour_matrix(run: Run):
    """001 Fig. 2a: final trait score per (starting model, post-finetuning data), one panel per method;
    the "(none)" column is each starting model before post-finetuning (step 0)."""
    alt = altair()
    m = behaviour(run)
    none_col = (m.group_by("method", "start", "trait").agg(pl.col("start_mean").mean().alias("mean"))
                .with_columns(post=pl.lit("(none)")))
    df = pl.concat([m.select("method", "start", "post", "trait", "mean"), none_col.select("method", "start", "post", "trait", "mean")])
    cols = ["(none)", *dict.fromkeys(m["post"].to_list())]
    return (
        matrix(alt, df, "mean", "trait score", "reds", [0.0, 100.0], cols, start_order(run))
        .facet(column=alt.Column("method:N", title="post-finetuning method"), row=alt.Row("trait:N"))
        .properties(title=title(f"{run.name}: behaviour matrix (seed 001 Fig. 2a)",
                                "trait score at the final step; (none) = the starting model itself (step 0)"))
    )


def chart_behaviour_vs_none(run: Run):
    """001 Fig. 2b: paired (method - no-defense post-finetuning) from the same start on the same data."""
    alt = altair()
    m = behaviour(run).filter(pl.col("vs_none").is_not_null())
    if not m.height:
        raise Skip("no defended trial has a no-defense control at its start and data")
    lim = max(1.0, float(m["vs_none"].abs().max()))
    return (
        matrix(alt, m, "vs_none", "score − no defense", "redblue", [lim, -lim], list(dict.fromkeys(m["post"].to_list())),
               start_order(run))
        .facet(column=alt.Column("method:N", title="post-finetuning method"), row=alt.Row("trait:N"))
        .properties(title=title(f"{run.name}: defense effect per start and data (seed 001 Fig. 2b)",
                                "paired (method − no defense) at the final step over shared questions; negative = less trait",
                                CI_NOTE))
    )
