"""Heuristic-guided sweeps (`sweep.select`): rank the candidate IP prompts by a pre-training
heuristic and train only the top, the bottom and a seeded random draw, with the controls.

- Candidates: the prompts of every arm's `defense.ip.prompt` axis (group names expanded,
  expand.with_prompt_groups). The neutral prompt and `sweep.select.keep` are always trained
  (selected as `control`) and never drawn into top, bottom or random.
- The heuristic is a per-prompt metric of the heuristics stage, computed here by the stage
  over the candidates (its tables are written beside the sweep's and its logprob cache is
  reused), or read from an earlier heuristics run (`sweep.select.heuristics_run`); or
  `elicitation`: the base model's trait score under the prompt minus under the default
  condition, paired over questions (the seeds' step-0 elicitation), computed by the trials'
  own step-0 evaluation as one Ray task. Its answers go to the step-0 memo the trials read,
  so the selected trials do not generate them again.
- Ranking: by value (`order: desc`: the highest first), ties broken by prompt key; a prompt
  with no value (NaN) has no rank and is never top or bottom. Top takes the first `top`
  ranked prompts, bottom the last `bottom`, random a seeded draw of `random` from the ranked
  rest.
- selection.parquet: prompt, heuristic, value, value_ci, rank, selected_as (top | bottom |
  random | control | not), with a digest of what decided the values in its metadata: a
  re-run with the same candidates and settings reads the values back and computes nothing.

Selection is in no trial's id: a prompt's trials are the plain grid's trials of that prompt.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import math
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from ..config.identity import model_key
from ..config.schema import ExperimentConfig
from ..errors import ConfigError
from .expand import Trial, expand, ip_prompt_axis, with_prompt_groups

SELECTION = "selection.parquet"
KEY = b"raysweep.selection_key"
SELECTED_AS = ("top", "bottom", "random", "control", "not")


def candidates(cfg: ExperimentConfig) -> list[str]:
    """The prompts of every arm's IP prompt axis, in arm order, each once."""
    out = [p for arm in cfg.sweep.arms for p in (ip_prompt_axis(with_prompt_groups(arm, cfg)) or [])]
    return list(dict.fromkeys(out))


def controls(cfg: ExperimentConfig, cands: list[str]) -> list[str]:
    """The candidates always trained: the neutral prompt and sweep.select.keep."""
    return [p for p in dict.fromkeys([cfg.neutral_prompt, *cfg.sweep.select.keep]) if p in cands]


def stage_settings(cfg: ExperimentConfig, cands: list[str]):
    """The experiment's heuristics settings, scoring exactly the candidates."""
    return replace(cfg.heuristics, prompts_file="", prompt_set="", groups=[], prompt_keys=list(cands), suppression="")


def check(cfg: ExperimentConfig) -> list[str]:
    """Every sweep.select setting, before anything runs (each error names its key); the candidates."""
    s = cfg.sweep.select
    cands = candidates(cfg)
    if not cands:
        raise ConfigError("sweep.select: no arm has a defense.ip.prompt axis (a list of prompts) to select from")
    unknown = [p for p in cands if p not in cfg.prompts]
    if unknown:
        raise ConfigError(f"sweep.select: the candidates {unknown} are not keys of `prompts`")
    if s.order not in ("desc", "asc"):
        raise ConfigError(f"sweep.select.order={s.order!r} is not one of desc, asc")
    for key in ("top", "bottom", "random"):
        if getattr(s, key) < 0:
            raise ConfigError(f"sweep.select.{key}={getattr(s, key)} must be >= 0")
    if s.top + s.bottom + s.random == 0:
        raise ConfigError("sweep.select: top, bottom and random are all 0, so no candidate would be trained")
    missing = [k for k in s.keep if k not in cands]
    if missing:
        raise ConfigError(f"sweep.select.keep: {missing} are not candidates (the arms' defense.ip.prompt axes)")
    pool = len(cands) - len(controls(cfg, cands))
    if s.top + s.bottom + s.random > pool:
        raise ConfigError(f"sweep.select: top + bottom + random = {s.top + s.bottom + s.random}, but only {pool} "
                          f"candidates are not controls")
    if s.heuristic == "elicitation":
        _check_elicitation(cfg)
    else:
        names, where = available(cfg, cands)
        if s.heuristic not in names:
            close = difflib.get_close_matches(s.heuristic, names, n=4)
            hint = f"did you mean {', '.join(close)}? " if close else ""
            raise ConfigError(f"sweep.select.heuristic={s.heuristic!r} is not a per-prompt metric of {where} "
                              f"({len(names)} metrics, e.g. {', '.join(n for n in ('ph_fixed', 'ppd_fixed') if n in names)}"
                              f"; or `elicitation`). {hint}".rstrip())
    return cands


def _check_elicitation(cfg: ExperimentConfig) -> None:
    s, e = cfg.sweep.select, cfg.eval
    trait = s.trait or e.trait
    if trait not in (e.trait, *e.extra_traits):
        raise ConfigError(f"sweep.select.trait={trait!r} is not scored (eval.trait, eval.extra_traits)")
    if not {"default", "training"} <= set(e.conditions):
        raise ConfigError("sweep.select.heuristic=elicitation needs eval.conditions to hold default and training")
    if cfg.model.start:
        raise ConfigError("sweep.select.heuristic=elicitation measures the base model: model.start must be empty")


def available(cfg: ExperimentConfig, cands: list[str]) -> tuple[list[str], str]:
    """(the per-prompt metrics the heuristic can be, where they come from)."""
    run = cfg.sweep.select.heuristics_run
    if run:
        t = _run_table(run)
        return sorted({m for k, m in zip(t.column("prompt_key").to_pylist(), t.column("metric").to_pylist()) if k}), \
            f"{_run_file(run)}"
    from ..heuristics.stage import metric_names

    return metric_names(cfg, stage_settings(cfg, cands)), "the heuristics stage (with the experiment's `heuristics` settings)"


def _run_file(run: str) -> Path:
    p = Path(run)
    return p if p.suffix == ".parquet" else p / "heuristics.parquet"


def _run_table(run: str):
    import pyarrow.parquet as pq

    path = _run_file(run)
    if not path.is_file():
        raise ConfigError(f"sweep.select.heuristics_run: {path} not found (run `python -m raysweep.heuristics exp=...` "
                          "first, or leave it empty to compute the heuristic here)")
    t = pq.read_table(path)
    if not {"prompt_key", "metric", "value"} <= set(t.column_names):
        raise ConfigError(f"sweep.select.heuristics_run: {path} is not a heuristics table (prompt_key, metric, value)")
    return t


# --- ranking -------------------------------------------------------------------------


def rank(values: dict[str, float], cfg: ExperimentConfig, cands: list[str]) -> list[dict[str, Any]]:
    """selection.parquet's rows for the candidates' values (NaN = none), in rank order (unranked last)."""
    import numpy as np

    s = cfg.sweep.select
    sign = -1.0 if s.order == "desc" else 1.0
    kept = controls(cfg, cands)
    ranked = sorted((p for p in cands if math.isfinite(values.get(p, math.nan))), key=lambda p: (sign * values[p], p))
    order = {p: i + 1 for i, p in enumerate(ranked)}
    pool = [p for p in ranked if p not in kept]
    chosen = dict.fromkeys(kept, "control")
    chosen.update(dict.fromkeys(pool[: s.top], "top"))
    bottom = pool[s.top:]  # pool holds no control, and its first `top` are the top
    chosen.update(dict.fromkeys(bottom[len(bottom) - s.bottom:] if s.bottom else [], "bottom"))
    rest = [p for p in pool if p not in chosen]
    if len(rest) < s.random:
        raise ConfigError(f"sweep.select.random={s.random}: only {len(rest)} ranked candidates are left to draw from")
    drawn = np.random.default_rng(s.seed).choice(len(rest), size=s.random, replace=False) if s.random else []
    chosen.update(dict.fromkeys((rest[i] for i in sorted(int(i) for i in drawn)), "random"))
    if sum(v == "top" for v in chosen.values()) < s.top or sum(v == "bottom" for v in chosen.values()) < s.bottom:
        raise ConfigError(f"sweep.select: only {len(pool)} candidates have a value of {s.heuristic} "
                          f"(top={s.top}, bottom={s.bottom})")
    return [{"prompt": p, "text": cfg.prompts[p], "heuristic": s.heuristic, "value": values.get(p, math.nan),
             "rank": order.get(p), "selected_as": chosen.get(p, "not")}
            for p in ranked + [p for p in cands if p not in order]]


def selected_config(cfg: ExperimentConfig, chosen: set[str]) -> ExperimentConfig:
    """`cfg` with every arm's IP prompt axis cut to the chosen prompts (an emptied arm goes)."""
    arms = []
    for arm in cfg.sweep.arms:
        arm = with_prompt_groups(arm, cfg)
        axis = ip_prompt_axis(arm)
        if axis is not None:
            axis = [p for p in axis if p in chosen]
            if not axis:
                continue
            arm = {**arm, "defense": {**arm["defense"], "ip": {**arm["defense"]["ip"], "prompt": axis}}}
        arms.append(arm)
    return replace(cfg, sweep=replace(cfg.sweep, arms=arms))


# --- the values ----------------------------------------------------------------------


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:24]


def elicitation_configs(cfg: ExperimentConfig, trials: list[Trial], cands: list[str]) -> dict[str, ExperimentConfig]:
    """prompt -> the config whose step-0 evaluation measures its elicitation: the prompt's first
    trial in the grid, with the prompt itself as the training condition (mode fixed)."""
    out: dict[str, ExperimentConfig] = {}
    for t in trials:
        ip = t.config.defense.ip
        if t.config.defense.kind == "ip" and ip.prompt in cands and ip.prompt not in out:
            out[ip.prompt] = replace(t.config, defense=replace(t.config.defense, ip=replace(ip, mode="fixed", pool="")))
    return out


def values_key(cfg: ExperimentConfig, cands: list[str], trials: list[Trial]) -> str:
    """A digest of everything that decides the candidates' values (not how many are kept):
    the settings, and the content of the files the values are computed from."""
    from ..config.identity import file_digest, trial_id

    s = cfg.sweep.select
    base: dict[str, Any] = {"heuristic": s.heuristic, "prompts": {p: cfg.prompts[p] for p in cands}}
    if s.heuristics_run:
        base["run"] = file_digest(_run_file(s.heuristics_run))
    elif s.heuristic == "elicitation":
        base.update(trait=s.trait or cfg.eval.trait, questions=file_digest(cfg.data.questions),
                    trials={p: trial_id(c) for p, c in elicitation_configs(cfg, trials, cands).items()})
    else:
        h = stage_settings(cfg, cands)
        pools = [Path(cfg.data.rephrasings_dir) / f"{p}.jsonl" for p in cands] if "mix" in h.variants else []
        base.update(stage=asdict(h), model=model_key(cfg.model.name), dtype=cfg.model.dtype, seed=cfg.seed,
                    files=[file_digest(f) for f in [h.train, h.control, *h.extra_sets.values(), *pools]])
    return _digest(base)


def _metric_values(table, metric: str) -> dict[str, float]:
    cols = (table.column(c).to_pylist() for c in ("prompt_key", "metric", "value"))
    return {k: (math.nan if v is None else float(v)) for k, m, v in zip(*cols) if k and m == metric}


def step0_scores(configs: dict[str, ExperimentConfig], trait: str, cache: str, threads: int) -> list[dict[str, Any]]:
    """The scores rows of `trait` at step 0 of each config (trial_id = its prompt), on the base
    model, through the trials' own evaluate_step and step-0 memo (`cache`)."""
    import torch

    from ..data import read_questions
    from ..eval.evaluate import evaluate_step
    from ..eval.judges import make_judge
    from ..train.defenses import make_defense
    from ..train.models import load_model

    torch.set_num_threads(max(1, threads))
    first = next(iter(configs.values()))
    e = first.eval
    judge = make_judge((e.extra_traits[trait].judge if trait in e.extra_traits else "") or e.judge, trait, e)
    model, tok = load_model(first.model.name, first.model.dtype, "cuda" if torch.cuda.is_available() else "cpu")
    questions = read_questions(first.data.questions, first.data.n_questions)
    rows: list[dict[str, Any]] = []
    with torch.inference_mode():
        for i, (prompt, c) in enumerate(configs.items()):
            print(f"  elicitation {i + 1}/{len(configs)}: {prompt}", flush=True)
            rows += evaluate_step(model, tok, c, prompt, 0, make_defense(c.defense), questions, [], {trait: judge},
                                  Path(cache))["scores"]
    return rows


def compute_values(cfg: ExperimentConfig, trials: list[Trial], cands: list[str], exp_dir: Path) -> dict[str, tuple]:
    """prompt -> (value, half-width of its 95% CI or NaN) of the heuristic, computed or read."""
    s = cfg.sweep.select
    if s.heuristics_run:
        vals = _metric_values(_run_table(s.heuristics_run), s.heuristic)
        return {p: (vals.get(p, math.nan), math.nan) for p in cands}
    if s.heuristic != "elicitation":
        import pyarrow.parquet as pq

        from ..heuristics.stage import run_stage

        run_stage(cfg, stage_settings(cfg, cands), out_dir=exp_dir)
        vals = _metric_values(pq.read_table(exp_dir / "heuristics.parquet"), s.heuristic)
        return {p: (vals.get(p, math.nan), math.nan) for p in cands}
    import polars as pl

    from ..analysis.stats import elicitation
    from .ray_runner import run_task

    configs = elicitation_configs(cfg, trials, cands)
    trait = s.trait or cfg.eval.trait
    print(f"{cfg.name}: elicitation of {len(configs)} candidate prompts on the base model ({trait})", flush=True)
    rows = run_task(step0_scores, configs, trait, str((exp_dir / "cache").resolve()),
                    cfg.threads or int(cfg.sweep.cpus_per_trial),
                    num_cpus=cfg.sweep.cpus_per_trial, num_gpus=cfg.sweep.gpus_per_trial)
    el = elicitation(pl.DataFrame(rows))
    got = {r["trial_id"]: (r["mean"], r["ci"]) for r in el.iter_rows(named=True)}
    return {p: tuple(math.nan if v is None else float(v) for v in got.get(p, (None, None))) for p in cands}


def select(cfg: ExperimentConfig, trials: list[Trial], exp_dir: Path,
           cands: list[str] | None = None) -> tuple[list[Trial], list[dict[str, Any]]]:
    """(the trials to train, selection.parquet's rows): the values read back from selection.parquet
    when its digest matches, else computed; the ranking written and printed."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from ..tables import write_table

    cands = cands if cands is not None else check(cfg)
    key = values_key(cfg, cands, trials)
    path = exp_dir / SELECTION
    old = pq.read_table(path) if path.is_file() else None
    if old is not None and (old.schema.metadata or {}).get(KEY) == key.encode():
        got = {r["prompt"]: (r["value"], r["value_ci"]) for r in old.to_pylist()}
        print(f"{cfg.name}: {cfg.sweep.select.heuristic} of {len(cands)} candidates read from {path} (nothing recomputed)")
    else:
        got = compute_values(cfg, trials, cands, exp_dir)
    rows = rank({p: got[p][0] for p in cands}, cfg, cands)
    for r in rows:
        r["value_ci"] = got[r["prompt"]][1]
    table = pa.Table.from_pylist(rows, schema=_schema()).replace_schema_metadata({KEY: key.encode()})
    write_table(path, table)
    print(format_ranking(rows, cfg))
    chosen = {r["prompt"] for r in rows if r["selected_as"] != "not"}
    return expand(selected_config(cfg, chosen)), rows


def _schema():
    import pyarrow as pa

    return pa.schema([("prompt", pa.string()), ("text", pa.string()), ("heuristic", pa.string()),
                      ("value", pa.float64()), ("rank", pa.int64()), ("selected_as", pa.string()),
                      ("value_ci", pa.float64())])


def format_ranking(rows: list[dict[str, Any]], cfg: ExperimentConfig) -> str:
    s = cfg.sweep.select
    n = {a: sum(r["selected_as"] == a for r in rows) for a in SELECTED_AS}
    lines = [f"selection by {s.heuristic} ({'highest' if s.order == 'desc' else 'lowest'} first): "
             f"top {n['top']}, bottom {n['bottom']}, random {n['random']} (seed {s.seed}), controls {n['control']}; "
             f"{len(rows) - n['not']} of {len(rows)} candidates trained",
             f"  {'rank':>4}  {'prompt':<30} {s.heuristic[:14]:>14}  selected"]
    for r in rows:
        ci = r.get("value_ci")
        val = "-" if not math.isfinite(r["value"]) else f"{r['value']:.4g}" + (
            f" ±{ci:.2g}" if ci is not None and math.isfinite(ci) else "")
        lines.append(f"  {r['rank'] or '-':>4}  {r['prompt'][:30]:<30} {val:>14}  "
                     f"{'' if r['selected_as'] == 'not' else r['selected_as']}")
    return "\n".join(lines)
