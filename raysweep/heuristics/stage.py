"""One experiment's heuristics stage: read inputs, run the logprob pass, compute every metric, write tables.

Writes to <storage>/<exp>/: logprobs.parquet, token_logprobs.parquet, selfperp.parquet,
heuristics.parquet, angles.parquet, prompts.parquet (prompt_key, label = trait group, text),
heuristic_performance.parquet and suppression.parquet (when a suppression table is given: a
copy of it, so the report colours prompt embeddings by it) and heuristics.yaml (the settings used). Every input is read before the
model loads; a bad one fails naming the file.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..config.identity import model_key
from ..data import Messages, read_chat, read_pool, shuffled
from .config import HeuristicsConfig, validate

TABLES = ("logprobs", "token_logprobs", "selfperp", "heuristics", "angles", "prompts", "heuristic_performance",
          "suppression")


def prompt_library(h: HeuristicsConfig, prompts: dict[str, str],
                   groups: dict[str, list[str]]) -> tuple[dict[str, str], dict[str, list[str]], str]:
    """(key -> text, group -> keys, where they come from): the experiment's `prompts` and
    `prompt_groups`, or the `prompt_set` entry of heuristics.prompts_file (the seed
    repository's prompts.json format: group -> {key: text})."""
    if not h.prompts_file:
        missing = sorted({k for keys in groups.values() for k in keys} - set(prompts))
        if missing:
            raise ConfigError(f"prompt_groups: {missing} are not keys of `prompts`")
        return dict(prompts), {g: list(keys) for g, keys in groups.items()}, "prompt_groups"
    path = Path(h.prompts_file)
    if not path.is_file():
        raise ConfigError(f"heuristics.prompts_file: {path} not found")
    data = json.loads(path.read_text())
    entry = data.get(h.prompt_set) if h.prompt_set else data
    if not isinstance(entry, dict) or not isinstance(entry.get("groups"), dict):
        raise ConfigError(f'{path}: no "groups" under {h.prompt_set!r}')
    texts = {key: text for members in entry["groups"].values() for key, text in members.items()}
    return texts, {g: list(members) for g, members in entry["groups"].items()}, str(path)


def resolve_prompts(h: HeuristicsConfig, prompts: dict[str, str],
                    groups: dict[str, list[str]] | None = None) -> tuple[dict[str, str], dict[str, str]]:
    """(key -> text of the prompts to score, key -> trait label): heuristics.groups of the
    library's groups (none named: every group's prompts, or the whole library when it has no
    groups or heuristics.prompt_keys names the prompts), then heuristics.prompt_keys; labels
    from heuristics.traits (a prompt's group is its group in the library)."""
    library, groups, source = prompt_library(h, prompts, groups or {})
    unknown = [g for g in h.groups if g not in groups]
    if unknown:
        raise ConfigError(f"heuristics.groups: {unknown} not in {source} ({', '.join(groups) or 'no groups'})")
    group_of = {key: g for g in groups for key in groups[g]}
    selected = h.groups or ([] if h.prompt_keys else list(groups))
    if selected:
        chosen = {key: library[key] for g in selected for key in groups[g]}
        group_of.update({key: g for g in selected for key in groups[g]})
    else:
        chosen = library
    if h.prompt_keys:
        missing = [k for k in h.prompt_keys if k not in chosen]
        if missing:
            raise ConfigError(f"heuristics.prompt_keys: {missing} are not among the selected prompts")
        chosen = {k: chosen[k] for k in h.prompt_keys}
    labels: dict[str, str] = {}
    for label, names in h.traits.items():
        for name in names:
            for key in chosen:
                if key == name or group_of.get(key) == name:
                    labels[key] = label
    return chosen, labels


def resolve_gap_fit(h: HeuristicsConfig, prompts: dict[str, str], library: dict[str, str],
                    groups: dict[str, list[str]] | None = None) -> dict[str, list[str]]:
    """heuristics.gap_fit as label -> selected prompt keys (names: groups or prompt keys)."""
    if not h.gap_fit:
        return {}
    _, groups, _ = prompt_library(h, library, groups or {})
    group_of = {key: g for g, members in groups.items() for key in members}
    out: dict[str, list[str]] = {}
    for label, names in h.gap_fit.items():
        unknown = [n for n in names if n not in groups and n not in prompts]
        if unknown:
            raise ConfigError(f"heuristics.gap_fit.{label}: {unknown} are neither groups nor prompt keys")
        out[label] = [k for k in prompts if k in names or group_of.get(k) in names]
    return out


def read_sets(h: HeuristicsConfig, seed: int) -> dict[str, list[Messages]]:
    """The completion sets: train, control and the extra (cross-trait) sets."""
    sets = {"train": shuffled(read_chat(h.train), seed, h.n_train),
            "control": shuffled(read_chat(h.control), seed, h.n_control)}
    for name, path in h.extra_sets.items():
        sets[name] = shuffled(read_chat(path), seed, h.n_extra)
    return sets


def read_pools(rephrasings_dir: str, prompts: dict[str, str]) -> dict[str, list[str]]:
    return {key: read_pool(Path(rephrasings_dir) / f"{key}.jsonl") for key in prompts}


def _read_suppression(path: str):
    import pyarrow.csv as pcsv
    import pyarrow.parquet as pq

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"heuristics.suppression: {p} not found")
    t = pcsv.read_csv(str(p)) if p.suffix == ".csv" else pq.read_table(str(p))
    missing = {"prompt_key", "prefix_type", "suppression"} - set(t.column_names)
    if missing:
        raise ConfigError(f"{p}: missing columns {sorted(missing)} (need prompt_key, prefix_type, suppression)")
    return t


def score_fn(h: HeuristicsConfig, model_name: str, dtype: str, threads: int = 0):
    """items -> {key: per-token log-probs}: in-process, or as a Ray Data job when h.ray."""
    from ..sweep.ray_runner import ensure_ray
    from .logprobs import make_scorer, score_plain, score_ray

    kwargs = {"model_name": model_name, "dtype": dtype, "device": h.device, "token_budget": h.token_budget,
              "head_chunk": h.head_chunk, "share_prefix": h.share_prefix, "pack": h.pack, "compile": h.compile}
    if h.backend == "vllm":  # the engine is a Ray Data job itself: run it from here, on a local Ray if none
        def run_vllm(items):
            ensure_ray()
            return score_plain(items, make_scorer("vllm", **kwargs))

        return run_vllm
    if h.ray:
        def run_ray(items):
            ensure_ray()
            return score_ray(items, backend=h.backend, backend_kwargs=kwargs, concurrency=h.concurrency,
                             batch_rows=h.batch_rows, num_cpus=h.num_cpus, num_gpus=h.num_gpus)

        return run_ray

    scorer: list[Any] = []  # built on first use: a fully cached pass loads no model

    def run_plain(items):
        import torch

        if threads:
            torch.set_num_threads(threads)
        if not scorer:
            scorer.append(make_scorer(h.backend, **kwargs))
        return score_plain(items, scorer[0])

    return run_plain


def run_stage(cfg, h: HeuristicsConfig, out_dir: str | Path | None = None) -> dict[str, Path]:
    """Run the stage for experiment config `cfg` (model, seed, prompts, data.rephrasings_dir, storage)."""
    from transformers import AutoTokenizer

    from ..train.models import resolve_model
    from . import logprobs as lp

    validate(h)
    out = Path(out_dir) if out_dir else Path(cfg.storage) / cfg.name
    prompts, labels = resolve_prompts(h, cfg.prompts, cfg.prompt_groups)
    if not prompts:
        raise ConfigError("heuristics: no prompts selected")
    gap_fit = resolve_gap_fit(h, prompts, cfg.prompts, cfg.prompt_groups)
    sets = read_sets(h, cfg.seed)
    pools = read_pools(cfg.data.rephrasings_dir, prompts) if "mix" in h.variants else {}
    suppression = _read_suppression(h.suppression) if h.suppression else None

    t0 = time.time()
    tokenizer = AutoTokenizer.from_pretrained(resolve_model(cfg.model.name))
    rows = lp.build_rows(prompts, sets, pools=pools, placement=h.placement, variants=h.variants)
    model_id = f"{h.backend}:{model_key(cfg.model.name)}:{cfg.model.dtype}"
    keys, items = lp.encode_rows(tokenizer, rows, model_id, h.max_len)
    sp_rows = [(k, kind, seq) for k, text in prompts.items()
               for kind, seq in lp.selfperp_sequences(tokenizer, text, h.placement).items()]
    sp_keys = [lp.content_key(model_id, *seq) for _k, _kind, seq in sp_rows]
    items.update({key: seq for key, (_k, _kind, seq) in zip(sp_keys, sp_rows)})
    cache_path = out / "cache" / "logprobs.parquet"
    cache = lp.load_cache(cache_path) if h.cache else {}
    todo = {k: v for k, v in items.items() if k not in cache}
    n_tok = sum(len(ids) for ids, _ in todo.values())
    sizes = ", ".join(f"{s}={len(c)}" for s, c in sets.items())
    print(f"heuristics: {len(prompts)} prompts x {h.variants} + default over {sizes}: {len(rows)} rows, "
          f"{len(items)} unique sequences, {len(todo)} to score ({n_tok} tokens){' on Ray Data' if h.ray else ''}")
    t1 = time.time()
    lps = lp.run_pass(keys + sp_keys, items, score_fn(h, cfg.model.name, cfg.model.dtype, cfg.threads), cache)
    dt = time.time() - t1
    if todo:
        print(f"  scored {len(todo)} sequences in {dt:.1f}s ({n_tok / max(dt, 1e-9):.0f} tokens/s)")
    if h.cache and todo:
        lp.save_cache(cache_path, cache)
    logprobs, tokens = lp.logprob_tables(rows, lps[: len(rows)])
    selfperp = lp.selfperp_table([k for k, _kind, _s in sp_rows], [kind for _k, kind, _s in sp_rows], lps[len(rows):])
    tables = {"logprobs": logprobs, "token_logprobs": tokens, "selfperp": selfperp}
    return write_tables(out, cfg, h, prompts, labels, gap_fit, tables, suppression, t0)


def write_tables(out: Path, cfg, h: HeuristicsConfig, prompts: dict[str, str], labels: dict[str, str],
                 gap_fit: dict[str, list[str]], tables: dict[str, Any], suppression=None,
                 t0: float | None = None) -> dict[str, Path]:
    """Every metric from the pass's tables (logprobs, and token_logprobs / selfperp when there),
    written with them to `out`; the stage's end, shared by a run and an import."""
    import pyarrow as pa

    from ..tables import write_table, write_text
    from .families import angle_table, heuristics_table
    from .performance import heuristic_performance

    inp = _inputs(h, labels, gap_fit, tables)
    tables = {name: t for name, t in tables.items() if t is not None}
    tables["heuristics"] = heuristics_table(inp, h.metrics)
    if not h.metrics or "angles" in h.metrics:
        tables["angles"] = angle_table(inp)
    tables["prompts"] = pa.table({"prompt_key": list(prompts), "label": [labels.get(k, "") for k in prompts],
                                  "text": list(prompts.values())})
    if suppression is not None:
        tables["heuristic_performance"] = heuristic_performance(tables["heuristics"], suppression)
        tables["suppression"] = suppression
    paths = {name: write_table(out / f"{name}.parquet", t) for name, t in tables.items()}
    write_text(out / "heuristics.yaml", _settings_yaml(cfg, h))
    took = f" ({time.time() - t0:.1f}s)" if t0 is not None else ""
    print(f"  {tables['heuristics'].num_rows} heuristic values; tables in {out}{took}")
    print(summary_text(tables["heuristics"], list(prompts)))
    return paths


def _inputs(h: HeuristicsConfig, labels: dict[str, str], gap_fit: dict[str, list[str]], tables: dict[str, Any]):
    from .families import Inputs

    return Inputs(logprobs=tables["logprobs"], token_logprobs=tables.get("token_logprobs"),
                  selfperp=tables.get("selfperp"), groups=labels, neutral=h.neutral, value=h.value,
                  n_components=h.n_components, variants=tuple(h.variants), gap_fit=gap_fit)


def metric_names(cfg, h: HeuristicsConfig) -> list[str]:
    """The per-prompt metrics a run of the stage with these settings writes, sorted: the metric
    families run over a synthetic pass of the same shape (the selected prompts, variants and
    completion sets; 4 examples of random log-probs). No model, no data file is read."""
    import numpy as np

    from . import logprobs as lp
    from .families import heuristics_table

    validate(h)
    prompts, labels = resolve_prompts(h, cfg.prompts, cfg.prompt_groups)
    gap_fit = resolve_gap_fit(h, prompts, cfg.prompts, cfg.prompt_groups)
    sets = ["train", "control", *h.extra_sets]
    rows = [{"prompt_key": k, "variant": v, "set": s, "example_id": i}
            for k, v in [("", "default"), *((k, v) for k in prompts for v in h.variants)] for s in sets for i in range(4)]
    rng = np.random.default_rng(0)
    logprobs, tokens = lp.logprob_tables(rows, [rng.normal(-1.0, 0.5, 3) for _ in rows])
    selfperp = lp.selfperp_table([k for k in prompts for _ in range(2)], ["raw", "context"] * len(prompts),
                                 [rng.normal(-1.0, 0.5, 3) for _ in range(2 * len(prompts))])
    inp = _inputs(h, labels, gap_fit, {"logprobs": logprobs, "token_logprobs": tokens, "selfperp": selfperp})
    t = heuristics_table(inp, h.metrics)
    return sorted({m for k, m in zip(t.column("prompt_key").to_pylist(), t.column("metric").to_pylist()) if k})


def import_stage(cfg, h: HeuristicsConfig, path: str | Path, tokens_path: str | Path | None = None,
                 out_dir: str | Path | None = None) -> dict[str, Path]:
    """The stage's tables from a seed per-example logprob file (`results/perplexity_heuristic_*.json`,
    and its per-token twin): the prompts are the file's, grouped and labelled by the experiment
    (prompt_groups, heuristics.traits / neutral / gap_fit), so angle summaries and the Exp 20
    fitting sets are the experiment's. No model runs."""
    from .seed_import import import_perplexity_json, import_tokens_json, seed_prompts

    validate(h)
    out = Path(out_dir) if out_dir else Path(cfg.storage) / cfg.name
    try:
        file_prompts = seed_prompts(path)
        logprobs = import_perplexity_json(path)
        tokens = import_tokens_json(tokens_path) if tokens_path else None
    except (OSError, ValueError) as exc:
        raise ConfigError(f"import: {exc}") from None
    selected, labels = resolve_prompts(replace(h, groups=[], prompt_keys=[]), cfg.prompts, cfg.prompt_groups)
    keys = dict.fromkeys(k for k in logprobs.column("prompt_key").to_pylist() if k)  # the file's, in its order
    prompts = {k: file_prompts.get(k) or selected.get(k, "") for k in keys}
    unlabelled = [k for k in prompts if k not in labels]
    if h.traits and unlabelled:
        print(f"  note: {len(unlabelled)} prompts of {path} are in no heuristics.traits group: {unlabelled[:8]}")
    gap_fit = resolve_gap_fit(h, prompts, {**cfg.prompts, **prompts}, cfg.prompt_groups)
    suppression = _read_suppression(h.suppression) if h.suppression else None
    print(f"heuristics: imported {logprobs.num_rows} per-example values of {len(prompts)} prompts from {path}")
    return write_tables(out, cfg, h, prompts, labels, gap_fit, {"logprobs": logprobs, "token_logprobs": tokens},
                        suppression)


def _settings_yaml(cfg, h: HeuristicsConfig) -> str:
    from omegaconf import OmegaConf

    return OmegaConf.to_yaml(OmegaConf.create({"name": cfg.name, "seed": cfg.seed, "model": asdict(cfg.model),
                                               "rephrasings_dir": cfg.data.rephrasings_dir, "heuristics": asdict(h)}))


def summary_text(heuristics, keys: list[str], metrics=("ph_fixed", "ph_mix", "ppd_fixed", "gamma_fixed", "snr_fixed",
                                                       "selfperp_raw")) -> str:
    """A per-prompt table of headline heuristics (the full set is in heuristics.parquet)."""
    vals: dict[tuple[str, str], float] = {}
    for k, m, v in zip(*(heuristics.column(c).to_pylist() for c in ("prompt_key", "metric", "value"))):
        vals[(k, m)] = v
    shown = [m for m in metrics if any((k, m) in vals for k in keys)]
    lines = [f"  {'prompt':<30}" + "".join(f"{m:>14}" for m in shown)]
    for k in keys:
        lines.append(f"  {k:<30}" + "".join(f"{vals.get((k, m), float('nan')):>14.4f}" for m in shown))
    return "\n".join(lines)
