"""One experiment's mechanistic stage: the analyses of `mech.analyses`, in order, each writing its tables.

Writes to <storage>/<exp>/mech/: vectors/<name>.safetensors (+ vector_samples.parquet),
grad_cosine.parquet + loss.parquet, grad_pca*.parquet, ip_pps_similarity.parquet,
projection.parquet (schemas `mech_*` in raysweep.tables), and mech.yaml (the settings used).
Every input is read before the model loads; a bad one fails naming the key or file.
"""

from __future__ import annotations

import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..data import read_chat, shuffled
from .config import MechCondition, MechConfig, validate
from .passes import Condition


def _made_names(m: MechConfig, cfg) -> list[str]:
    """Vector names the stage itself makes (available to later analyses)."""
    names = []
    if "vectors" in m.analyses:
        trait = m.extract.trait or Path(m.extract.trait_file).stem
        names += [trait, f"{trait}_random"]
    if "prompt_diff" in m.analyses:
        names.append("ip_diff")
    return names


def check(cfg) -> dict[str, Any]:
    """Validate `cfg.mech` and read every vector file; returns name -> [L+1, d] table."""
    from .vectors import load_table, read_trait

    m = cfg.mech
    validate(m, cfg.prompts)
    tables = {}
    for name, spec in m.vectors.items():
        path, _, key = spec.partition("#")  # file#KEY names a tensor of a multi-tensor safetensors file
        tables[name] = load_table(path, key)
    known = set(tables) | set(_made_names(m, cfg))
    used = [s.vector for c in m.conditions for s in c.steer] + list(m.compare) + ([m.pca_orient] if m.pca_orient else [])
    for name in used:
        if name not in known:
            raise ConfigError(f"mech: vector {name!r} is neither in mech.vectors nor made by the stage ({', '.join(sorted(known))})")
    if "vectors" in m.analyses:
        read_trait(m.extract.trait_file, m.extract.trait)
    for label, path in adapter_list(m).items():
        if not (Path(path) / "adapter_config.json").is_file():
            raise ConfigError(f"mech.adapters: {label}: {path} is not a LoRA adapter folder (no adapter_config.json)")
    return tables


def expand_conditions(m: MechConfig) -> list[MechCondition]:
    """Each condition with `coefs` becomes one per coefficient, named name@coef."""
    out = []
    for c in m.conditions:
        if not c.coefs:
            out.append(c)
            continue
        for coef in c.coefs:
            out.append(replace(c, name=f"{c.name}@{coef:g}", coefs=[],
                               steer=[replace(s, coef=float(coef)) for s in c.steer]))
    return out


def build_condition(c: MechCondition, prompts: dict[str, str], tables: dict[str, Any], n_layers: int,
                    seed: int = 0) -> Condition:
    triples = tuple((tables[s.vector][l].float(), l, s.coef) for s in c.steer for l in (s.layers or range(1, n_layers + 1)))
    label = "+".join(f"{s.vector}@{'all' if not s.layers else ','.join(map(str, s.layers))}" for s in c.steer)
    coefs = {s.coef for s in c.steer}
    return Condition(name=c.name, prompts=tuple(prompts[k] for k in c.ip), placement=c.placement, steer=triples,
                     seed=seed, ip="+".join(c.ip), steer_label=label, coef=coefs.pop() if len(coefs) == 1 else float("nan"))


def _answers(model, tok, cfg, conversations: list) -> list[str]:
    """Replies under `mech.extract`'s sampling settings, from the loaded model or a vLLM engine."""
    from ..config.backend import resolve_backend
    from ..eval.engine import Request, VLLMEngine
    from ..eval.generation import generate

    x = cfg.mech.extract
    if resolve_backend(x.backend) == "transformers":
        return generate(model, tok, conversations, max_new_tokens=x.max_new_tokens, temperature=x.temperature,
                        top_p=x.top_p, seed=cfg.seed, batch_size=cfg.mech.batch_size)
    from ..sweep.ray_runner import ensure_ray

    ensure_ray()  # RAY_ADDRESS, else a new local Ray: never a stale `ray start` cluster
    engine = VLLMEngine(cfg.model.name, cfg.model.dtype, num_gpus=1 if _device(cfg.mech) == "cuda" else 0, seed=cfg.seed)
    requests = [Request(messages=c, max_new_tokens=x.max_new_tokens, temperature=x.temperature, top_p=x.top_p,
                        seed=cfg.seed) for c in conversations]
    return [r.text for r in engine.run(requests)]


def extract(model, tok, cfg, out: Path) -> tuple[list[dict], dict[str, Path]]:
    """Persona vectors of `mech.extract`: generate, judge, keep aligned pairs, average, save."""
    from ..eval.judges import make_judge
    from .vectors import (
        KINDS,
        conversation,
        diff_vectors,
        mean_activations,
        prompt_rows,
        random_like,
        read_trait,
        save_vector,
        select_pairs,
    )

    x = cfg.mech.extract
    trait = read_trait(x.trait_file, x.trait)
    rows = prompt_rows(trait, x.system_template, x.neg_assistant, x.n_questions, x.n_samples, x.placement)
    answers = _answers(model, tok, cfg, [conversation(r, False) for r in rows])
    questions = [r["question"] for r in rows]
    judge = make_judge(x.judge, x.judge_trait or trait.name, cfg.eval)
    scores = judge(questions, answers)
    coherence = make_judge(x.coherence_judge, "coherence", cfg.eval)(questions, answers) if x.coherence_judge else None
    for i, (r, a, (s, why)) in enumerate(zip(rows, answers, scores)):
        r.update(answer=a, trait_score=s, reason=why, coherence=coherence[i][0] if coherence else None)
    select_pairs(rows, x.pos_min, x.neg_max, x.coherence_min)
    kept = {p: [r for r in rows if r["kept"] and r["polarity"] == p] for p in ("pos", "neg")}
    if not kept["pos"]:
        raise ValueError(f"persona vector {trait.name}: no pair passes pos >= {x.pos_min}, neg < {x.neg_max}, "
                         f"coherence >= {x.coherence_min} among {len(rows) // 2} pairs (see the thresholds in mech.extract)")
    acts = {p: mean_activations(model, tok, [conversation(r) for r in kept[p]], max_len=cfg.mech.max_len,
                                batch_size=cfg.mech.batch_size) for p in kept}
    vecs = diff_vectors(acts["pos"], acts["neg"])
    meta = {"trait": trait.name, "model": cfg.model.name, "trait_file": x.trait_file, "n_pairs": len(kept["pos"]),
            "judge": judge.name, "layout": "[num_layers+1, hidden]: row 0 embeddings, row l output of decoder layer l"}
    paths = {}
    for kind in KINDS:
        name = trait.name if kind == "response_avg" else f"{trait.name}_{kind}"
        paths[name] = save_vector(out / "vectors" / f"{name}.safetensors", vecs[kind], {**meta, "positions": kind})
    rnd = random_like(vecs["response_avg"], x.random_seed)
    paths[f"{trait.name}_random"] = save_vector(out / "vectors" / f"{trait.name}_random.safetensors", rnd,
                                                {**meta, "positions": "random, norm of response_avg per layer",
                                                 "seed": x.random_seed})
    return rows, paths


def adapter_list(m: MechConfig) -> dict[str, str]:
    """label -> adapter folder: `adapters`, then every step_<n> of each `adapter_runs` folder in step order."""
    out = dict(m.adapters)
    for run in m.adapter_runs:
        steps = sorted(Path(run).glob("step_*"), key=lambda p: int(p.name.split("_")[1]))
        if not steps:
            raise ConfigError(f"mech.adapter_runs: no step_<n> adapter folders in {run}")
        out.update({f"{Path(run).name}/{p.name}": str(p) for p in steps})
    return out


def _device(m: MechConfig) -> str:
    import torch

    return ("cuda" if torch.cuda.is_available() else "cpu") if m.device == "auto" else m.device


def _adapted(cfg, path: str):
    from peft import PeftModel

    from ..train.models import load_model

    base, tok = load_model(cfg.model.name, cfg.model.dtype, _device(cfg.mech))
    return PeftModel.from_pretrained(base, path).eval(), tok


def run_stage(cfg, out_dir: str | Path | None = None) -> dict[str, Path]:
    """Run `cfg.mech.analyses` for experiment config `cfg`; returns table name -> path."""
    import torch

    from ..train.models import load_model, model_layers
    from ..tables import write_table, write_text
    from . import analyses as A
    from .vectors import load_table, prompt_difference_vector

    m: MechConfig = cfg.mech
    tables = check(cfg)
    out = (Path(out_dir) if out_dir else Path(cfg.storage) / cfg.name) / "mech"
    convs = shuffled(read_chat(m.data or cfg.data.train), cfg.seed, m.n)
    t0 = time.time()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    model, tok = load_model(cfg.model.name, cfg.model.dtype, _device(m))
    n_layers = len(model_layers(model))
    layers = list(m.layers) or list(range(1, n_layers + 1))
    if max(layers) > n_layers:
        raise ConfigError(f"mech.layers: {max(layers)} is outside 1..{n_layers} for {cfg.model.name}")
    written: dict[str, Path] = {}

    def write(name: str, rows: list[dict]) -> None:
        written[name] = write_table(out / f"{name}.parquet", rows, f"mech_{name}")
        print(f"  {name}: {len(rows)} rows ({time.time() - t0:.1f}s)")

    if "vectors" in m.analyses:
        rows, paths = extract(model, tok, cfg, out)
        write("vector_samples", rows)
        tables.update({name: load_table(p) for name, p in paths.items()})
        written.update({f"vector:{n}": p for n, p in paths.items()})
    if "prompt_diff" in m.analyses:
        src = shuffled(read_chat(m.prompt_diff_data), cfg.seed, m.n) if m.prompt_diff_data else convs
        vec = prompt_difference_vector(model, tok, src, [cfg.prompts[k] for k in m.prompt_diff_prompts],
                                       seed=cfg.seed, max_len=m.max_len, batch_size=m.batch_size)
        from .vectors import save_vector

        written["vector:ip_diff"] = save_vector(out / "vectors" / "ip_diff.safetensors", vec,
                                                {"prompts": list(m.prompt_diff_prompts), "model": cfg.model.name})
        tables["ip_diff"] = vec
    compare = {k: tables[k] for k in (m.compare or tables)}
    conds = {c.name: build_condition(c, cfg.prompts, tables, n_layers, cfg.seed) for c in expand_conditions(m)}
    kw = {"max_len": m.max_len, "batch_size": m.batch_size}
    if "pca" in m.analyses:
        pca, pcos, scores = [], [], []
        for name in m.pca_defended:
            defended = [c for c in conds.values() if c.name == name or c.name.startswith(name + "@")]
            for d in defended:
                p, c, s = A.gradient_pca(model, tok, convs, d, conds[m.pca_baseline], layers, compare, m.pca_orient,
                                         threshold=m.pca_threshold, max_components=m.pca_max_components, **kw)
                pca, pcos, scores = pca + p, pcos + c, scores + s
        write("grad_pca", pca)
        write("grad_pca_cosine", pcos)
        write("grad_pca_scores", scores)
    if "ip_pps" in m.analyses:
        steered = [c for n in m.pps_conditions for c in conds.values() if c.name == n or c.name.startswith(n + "@")]
        write("ip_pps_similarity", A.ip_pps_similarity(model, tok, convs, conds[m.ip_condition], steered, layers, **kw))
    # Per model (base, then each adapter, loaded one at a time): gradient cosines and projections.
    cos_rows, loss_rows, proj_rows = [], [], []
    for label, path in [("base", "")] + list(adapter_list(m).items()):
        mdl, tk = _adapted(cfg, path) if path else (model, tok)
        if "grad_cosine" in m.analyses:
            c, lo = A.grad_cosine(mdl, tk, convs, list(conds.values()), compare, layers, span=m.span,
                                  model_label=label, **kw)
            cos_rows, loss_rows = cos_rows + c, loss_rows + lo
        if "projection" in m.analyses:
            proj_rows += A.activation_projection(mdl, tk, convs, compare, layers, span=m.span, model_label=label, **kw)
        del mdl
    if "grad_cosine" in m.analyses:
        write("grad_cosine", cos_rows)
        write("loss", loss_rows)
    if "projection" in m.analyses:
        write("projection", proj_rows)
    write_text(out / "mech.yaml", _settings_yaml(cfg))
    print(f"mech: {len(m.analyses)} analyses on {len(convs)} sequences, layers {layers}; tables in {out} "
          f"({time.time() - t0:.1f}s)")
    return written


def _settings_yaml(cfg) -> str:
    from omegaconf import OmegaConf

    return OmegaConf.to_yaml(OmegaConf.create({"name": cfg.name, "seed": cfg.seed, "model": asdict(cfg.model),
                                               "prompts": dict(cfg.prompts), "mech": asdict(cfg.mech)}))
