"""Settings of the mechanistic stage: `ExperimentConfig.mech` (this file is their defaults file).

The model is the experiment's `model`, prompt texts come from its `prompts`, judges use its
`eval` settings (endpoint, rubrics). Vector names refer to `mech.vectors` plus the vectors the
stage makes itself: the extracted persona vector (named by the trait), `<trait>_random`, and
`ip_diff` (the prompt-induced activation difference).
This module imports nothing from raysweep at import time (raysweep/config/schema.py imports it).
"""

from __future__ import annotations

from dataclasses import dataclass, field

ANALYSES = ("vectors", "prompt_diff", "grad_cosine", "pca", "ip_pps", "projection")


@dataclass(frozen=True)
class MechSteer:
    vector: str = ""  # name of a vector (mech.vectors or one the stage made)
    layers: list[int] = field(default_factory=list)  # decoder layers steered (1-based); empty = every layer
    coef: float = 1.5  # steering coefficient (001's default intensity)


@dataclass(frozen=True)
class MechCondition:
    name: str = ""  # label in the tables
    ip: list[str] = field(default_factory=list)  # keys of `prompts`: inoculation prompts, one drawn per sample (seeded); empty = none
    placement: str = "user_prefix"  # user_prefix | system, as defense.ip.placement
    steer: list[MechSteer] = field(default_factory=list)  # steering in the forward pass (PPS)
    coefs: list[float] = field(default_factory=list)  # intensity sweep: one condition per value, replacing every steer coef


@dataclass(frozen=True)
class ExtractConfig:
    trait_file: str = ""  # persona_vectors trait JSON: instruction pos/neg pairs, questions, eval_prompt
    trait: str = ""  # trait name: vector name, positive assistant name, judge trait (empty = the file's stem)
    system_template: str = "You are {article} {assistant} assistant. {instruction}"  # system prompt of each answer (placement system)
    placement: str = "system"  # system: the instruction in system_template | user_suffix: "{question}\n\n{instruction}", no system prompt
    neg_assistant: str = "helpful"  # assistant name in the negative system prompts
    n_questions: int = 0  # first N questions (0 = all)
    n_samples: int = 1  # answers per (instruction, question, polarity)
    max_new_tokens: int = 256  # answer length cap
    temperature: float = 1.0  # sampling temperature (0 = greedy)
    top_p: float = 1.0  # nucleus sampling
    backend: str = "transformers"  # generation engine: transformers | vllm | auto (activations always use transformers)
    judge: str = "langid"  # registered judge of the trait score (settings from `eval`)
    judge_trait: str = ""  # trait the judge scores (empty = `trait`)
    coherence_judge: str = ""  # registered judge of coherence ("" = no coherence filter)
    pos_min: float = 50.0  # keep a pair when the positive answer's trait score >= this
    neg_max: float = 50.0  # ... and the negative answer's trait score < this
    coherence_min: float = 50.0  # ... and both answers' coherence >= this (when judged)
    random_seed: int = 0  # seed of the matched-norm random control `<trait>_random`


@dataclass(frozen=True)
class MechConfig:
    analyses: list[str] = field(default_factory=list)  # run in this order: vectors prompt_diff grad_cosine pca ip_pps projection
    data: str = ""  # chat JSONL analysed (empty = data.train)
    n: int = 8  # first N sequences after a seeded shuffle (0 = all)
    layers: list[int] = field(default_factory=list)  # decoder layers analysed (1-based); empty = every layer
    span: str = "response"  # positions averaged in grad_cosine / projection: response (assistant tokens) | all
    max_len: int = 512  # tokens per sequence, longer ones truncated
    batch_size: int = 4  # rows per forward/backward pass (an intensity sweep runs its coefficients as copies of each sequence in one pass)
    device: str = "auto"  # auto (cuda when present) | cpu | cuda
    vectors: dict[str, str] = field(default_factory=dict)  # name -> [num_layers+1, hidden] vector file (.safetensors / .pt)
    compare: list[str] = field(default_factory=list)  # vectors the gradient / activations are compared with (empty = all)
    conditions: list[MechCondition] = field(default_factory=list)  # forward-pass conditions of grad_cosine
    pca_defended: list[str] = field(default_factory=list)  # conditions whose gradient difference is decomposed
    pca_baseline: str = ""  # the defenseless condition they are compared with
    pca_orient: str = ""  # vector that orients each component (positive cosine)
    pca_threshold: float = 0.95  # report components up to this cumulative explained fraction
    pca_max_components: int = 0  # ... and at most this many (0 = no cap: seed 001 App. F.2 keeps every component up to the threshold)
    ip_condition: str = ""  # ip_pps: the prompted condition
    pps_conditions: list[str] = field(default_factory=list)  # ip_pps: steered conditions compared with it
    adapters: dict[str, str] = field(default_factory=dict)  # label -> LoRA adapter folder: grad_cosine and projection also run on each
    adapter_runs: list[str] = field(default_factory=list)  # <storage>/<exp>/adapters/<trial> folders: each step_<n> in it, as <trial>/step_<n>
    prompt_diff_prompts: list[str] = field(default_factory=list)  # keys of `prompts` for the ip_diff vector (one drawn per sample)
    prompt_diff_data: str = ""  # chat JSONL for ip_diff (empty = `data`; 001 uses a disjoint half)
    extract: ExtractConfig = field(default_factory=ExtractConfig)  # persona-vector extraction (analysis `vectors`)


def validate(m: MechConfig, prompts: dict[str, str]) -> None:
    """Checks that types alone cannot express; each error names its key."""
    from ..errors import ConfigError

    for a in m.analyses:
        if a not in ANALYSES:
            raise ConfigError(f"mech.analyses: unknown analysis {a!r} ({' | '.join(ANALYSES)})")
    if m.span not in ("response", "all"):
        raise ConfigError(f"mech.span={m.span!r} is not one of response, all")
    if m.extract.backend not in ("transformers", "vllm", "auto"):
        raise ConfigError(f"mech.extract.backend={m.extract.backend!r} is not one of transformers, vllm, auto")
    if m.extract.placement not in ("system", "user_suffix"):
        raise ConfigError(f"mech.extract.placement={m.extract.placement!r} is not one of system, user_suffix")
    if m.device not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"mech.device={m.device!r} is not one of auto, cpu, cuda")
    if m.batch_size < 1 or m.max_len < 2:
        raise ConfigError("mech.batch_size must be >= 1 and mech.max_len >= 2")
    if any(l < 1 for l in m.layers):
        raise ConfigError(f"mech.layers={list(m.layers)}: layers are 1-based decoder layers")
    names = [c.name for c in m.conditions]
    for i, c in enumerate(m.conditions):
        where = f"mech.conditions[{i}]"
        if not c.name or names.count(c.name) > 1:
            raise ConfigError(f"{where}.name={c.name!r}: every condition needs a unique name")
        for k in c.ip:
            if k not in prompts:
                raise ConfigError(f"{where}.ip: {k!r} is not a key of `prompts`")
        if c.placement not in ("user_prefix", "system"):
            raise ConfigError(f"{where}.placement={c.placement!r} is not one of user_prefix, system")
        if c.coefs and not c.steer:
            raise ConfigError(f"{where}.coefs needs steering entries to scale")
    for key, wanted in (("pca_defended", m.pca_defended), ("pps_conditions", m.pps_conditions),
                        ("pca_baseline", [m.pca_baseline] if m.pca_baseline else []),
                        ("ip_condition", [m.ip_condition] if m.ip_condition else [])):
        for w in wanted:
            if w not in names:
                raise ConfigError(f"mech.{key}: no condition named {w!r} (have {', '.join(names) or 'none'})")
    if "pca" in m.analyses and not (m.pca_defended and m.pca_baseline and m.pca_orient):
        raise ConfigError("mech.analyses has pca: set mech.pca_defended, mech.pca_baseline and mech.pca_orient")
    if "ip_pps" in m.analyses and not (m.ip_condition and m.pps_conditions):
        raise ConfigError("mech.analyses has ip_pps: set mech.ip_condition and mech.pps_conditions")
    if "vectors" in m.analyses and not m.extract.trait_file:
        raise ConfigError("mech.analyses has vectors: set mech.extract.trait_file")
    if "prompt_diff" in m.analyses and not m.prompt_diff_prompts:
        raise ConfigError("mech.analyses has prompt_diff: set mech.prompt_diff_prompts")
    for k in m.prompt_diff_prompts:
        if k not in prompts:
            raise ConfigError(f"mech.prompt_diff_prompts: {k!r} is not a key of `prompts`")
