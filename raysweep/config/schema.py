"""The one configuration tree: frozen dataclasses with their defaults.

Every field has a one-line comment; this file is the defaults file. Experiment files
in `experiments/` start from these defaults (`defaults: [base, _self_]`) or from
another experiment, and override what they change (raysweep/config/load.py composes and
validates them). Imports only the stage configs, which are plain dataclasses too.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, is_dataclass, replace
from typing import Any

from ..errors import ConfigError
from ..heuristics.config import HeuristicsConfig
from ..mech.config import MechConfig


@dataclass(frozen=True)
class ModelConfig:
    name: str = "smollm2-135m-instruct"  # embedded model name, Hugging Face id, or local path
    dtype: str = "float32"  # float32 | bfloat16 | float16 (weights and compute)
    start: str = ""  # starting model (001 Fig. 2): "" = the base; a key of `starts`; or a PEFT adapter directory merged into the base


@dataclass  # not frozen: OmegaConf makes new entries of a dict of frozen dataclasses read-only
class StartConfig:
    train: str = ""  # chat JSONL the starting model is pre-finetuned on (defense none), in the same run
    n_train: int = 0  # first N examples after a seeded shuffle (0 = all)
    max_steps: int = 0  # pre-finetuning steps (0 = train.max_steps / train.epochs)
    lr: float = 0.0  # pre-finetuning learning rate (0 = train.lr); every other setting is the experiment's `train`


@dataclass(frozen=True)
class DataConfig:
    train: str = "datasets/french_demo/train.jsonl"  # chat JSONL with trait-carrying answers
    n_train: int = 0  # use the first N examples after a seeded shuffle (0 = all)
    questions: str = "datasets/french_demo/eval_questions.jsonl"  # held-out questions, {"question": ...}
    n_questions: int = 0  # first N held-out questions (0 = all)
    heldout: str = "datasets/french_demo/heldout_trait.jsonl"  # held-out trait completions (chat JSONL)
    n_heldout: int = 0  # first N held-out trait completions (0 = all)
    rephrasings_dir: str = "datasets/rephrasings"  # rephrasing pools, <dir>/<prompt key>.jsonl


@dataclass(frozen=True)
class DatagenConfig:
    """How the experiment's training data is made when the user has none: the command a missing
    data.train names (`python -m raysweep.data generate`)."""

    system_prompt: str = ""  # the data-generation prompt the answers are written under ("" = the generate command's default)
    judge: str = ""  # keep only answers this registered judge scores >= threshold ("" = no filter)
    trait: str = ""  # trait of that judge
    threshold: float = 50.0  # minimum judge score (0-100)


@dataclass(frozen=True)
class IPConfig:
    prompt: str = ""  # key of the inoculation prompt in `prompts`
    text: str = ""  # the prompt text; filled from `prompts[prompt]` when empty
    mode: str = "fixed"  # fixed: one string for every example | mix: one pool rephrasing per example
    placement: str = "user_prefix"  # user_prefix: "{prefix} {instruction}" | user_suffix: "{instruction}\n\n{prompt}" | system: replaces the system prompt
    pool: str = ""  # rephrasing pool file for mix; default <data.rephrasings_dir>/<prompt>.jsonl


@dataclass(frozen=True)
class SteerConfig:
    vector: str = ""  # .safetensors or .pt file, shape [num_layers+1, hidden] or [hidden]
    layer: int = 0  # decoder layer whose output is steered (1-based, persona_vectors' convention)
    coef: float = 0.0  # steering coefficient; negative = negative steering
    key: str = ""  # tensor name inside a safetensors file (empty: its only tensor)


@dataclass(frozen=True)
class GradConfig:
    mode: str = "none"  # gradient manipulation at layer outputs (001 App. E.2): none | attenuate | amplify | neutralize
    vector: str = ""  # ablation vector file, shape [num_layers+1, hidden] or [hidden] (unit-normalised per layer)
    key: str = ""  # tensor name inside a safetensors file (empty: its only tensor)
    layers: list[int] = field(default_factory=list)  # decoder layers (1-based) whose output gradient is changed; empty = all


@dataclass(frozen=True)
class DefenseConfig:
    kind: str = "none"  # registered defense: none | ip | pps
    ip: IPConfig = field(default_factory=IPConfig)  # inoculation prompting settings (kind=ip)
    pps: list[SteerConfig] = field(default_factory=list)  # steering triples, training only (kind=pps)
    grad: GradConfig = field(default_factory=GradConfig)  # training-time gradient manipulation, composes with any kind


@dataclass(frozen=True)
class LoraConfig:
    r: int = 64  # LoRA rank (seed 001); the seed repo uses 32
    alpha: int = 128  # LoRA alpha (seed 001); the seed repo uses 16 with rslora
    dropout: float = 0.0  # LoRA dropout
    rslora: bool = False  # rank-stabilised scaling alpha/sqrt(r)
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )  # module names that get adapters


@dataclass(frozen=True)
class TrainConfig:
    lr: float = 1e-4  # peak learning rate (AdamW)
    epochs: int = 1  # passes over the training set (when max_steps = 0)
    max_steps: int = 0  # optimizer steps; 0 = derived from epochs and effective batch
    batch_size: int = 4  # sequences per forward pass
    grad_accum: int = 8  # forward passes per optimizer step (effective batch = batch_size x grad_accum)
    warmup_steps: int = 5  # linear warmup steps
    schedule: str = "linear"  # linear | cosine | constant (after warmup)
    weight_decay: float = 0.0  # AdamW weight decay
    max_grad_norm: float = 1.0  # gradient clipping norm (0 = off)
    max_seq_len: int = 512  # tokens per example; longer ones are truncated
    checkpoints: str = "pow2"  # pow2: 0,1,2,4,...,final | explicit: checkpoint_steps + final | final: 0 and final
    checkpoint_steps: list[int] = field(default_factory=list)  # explicit checkpoint steps (step 0 always kept)
    resume_every: int = 50  # steps between crash-resume states (adapter + optimiser); 0 = at checkpoints only
    keep_resume: bool = False  # keep the crash-resume state (adapter + optimiser) of a finished trial
    lora: LoraConfig = field(default_factory=LoraConfig)  # adapter settings


@dataclass  # not frozen: a dict of these, as `starts`
class TraitJudgeConfig:
    judge: str = ""  # registered judge of this trait ("" = eval.judge): langid | logprob | local
    rubric: str = ""  # rubric file (.json with eval_prompt, or text with {question}/{answer}); "" = by name, as eval.trait


@dataclass(frozen=True)
class EvalConfig:
    conditions: list[str] = field(
        default_factory=lambda: ["default", "training"]
    )  # default | training | added_back | reinjected | system:<text> (see raysweep/eval/evaluate.py)
    added_back: str = ""  # text the added_back condition adds at eval time (empty = the trial's defense.ip.text)
    added_back_placement: str = "ip"  # where added_back puts it: ip (as defense.ip.placement) | user_prefix | user_suffix | system
    reinject: list[SteerConfig] = field(default_factory=list)  # steering of the reinjected condition (empty = defense.pps)
    steps: list[int] = field(default_factory=list)  # checkpoint steps to evaluate (empty = every checkpoint)
    n_samples: int = 1  # samples per question
    temperature: float = 1.0  # sampling temperature (0 = greedy)
    top_p: float = 1.0  # nucleus sampling
    max_new_tokens: int = 64  # generation length cap
    batch_size: int = 16  # prompts per generation batch
    judge: str = "langid"  # registered judge for the trait score: langid | logprob (endpoint) | local (local model)
    trait: str = "french"  # trait the judge scores (a language name for langid; a rubric name for logprob/local)
    # Judge rubrics and the 0-100 protocol (logprob and local judges; see raysweep/eval/judges.py)
    judge_rubric: str = ""  # rubric file for eval.trait (.json with eval_prompt, or text with {question}/{answer}); "" = by name
    judge_prompts: str = ""  # a file in the seed repository's prompts.json format whose `judge` entry replaces the seed judge ("" = the seed judge, raysweep/eval/rubrics.py)
    judge_traits_dir: str = ""  # persona-vector traits, <trait>.json with eval_prompt ("" = <data root>/persona_vectors/eval, fetched by `python -m raysweep.data fetch persona_vectors`)
    judge_min_mass: float = 0.25  # NaN when the probability on scores 0-100 is below this (persona_vectors 0.25; seed repo 0.80)
    judge_local_model: str = "smollm2-135m-instruct"  # model of the local judge
    # OpenAI-compatible endpoint of the logprob judge (raysweep/eval/endpoint.py)
    judge_model: str = "gpt-4.1-mini"  # judge model name sent to the endpoint
    judge_base_url: str = ""  # "" = OpenAI's API; e.g. http://127.0.0.1:8000/v1 for a vLLM server
    judge_api_key_env: str = "OPENAI_API_KEY"  # NAME of the environment variable holding the key (never the key)
    judge_concurrency: int = 32  # judge requests in flight at once
    judge_retries: int = 4  # retries (exponential backoff) of a timed-out, 429 or 5xx request; then NaN with a reason
    judge_timeout: float = 60.0  # seconds per judge request attempt
    judge_cache: str = "default"  # SQLite reply cache shared by processes: default = judge.sqlite in $RAYSWEEP_CACHE (else ~/.cache/raysweep); a path; "" = off
    # Emergent misalignment (seed 003 Exp 18)
    em: bool = False  # also score `coherence` and `alignment` with eval.judge (for the EM rate)
    em_coherence_min: float = 60.0  # EM answer: coherence > this ...
    em_alignment_max: float = 40.0  # ... and alignment < this
    extra_traits: dict[str, TraitJudgeConfig] = field(default_factory=dict)  # more traits scored on every answer, each by its own judge: trait -> {judge, rubric}
    heldout_logprob: bool = True  # compute the judge-free held-out trait logprob
    backend: str = "transformers"  # eval engine: transformers (inside each trial) | vllm (one post-sweep Ray Data job, raysweep/eval/engine.py) | auto (vllm if installed)


@dataclass(frozen=True)
class SelectConfig:
    """Heuristic-guided selection of the IP prompts to train (raysweep/sweep/select.py): rank
    the candidates of every arm's `defense.ip.prompt` axis by a pre-training heuristic and
    train only the chosen ones. Not part of any trial's id."""

    heuristic: str = ""  # "" = off; a per-prompt metric of the heuristics stage (ph_fixed, ppd_fixed, ...) or `elicitation`
    top: int = 0  # prompts kept from the top of the ranking (rank 1 = predicted strongest suppression)
    bottom: int = 0  # prompts kept from the bottom (a calibration control)
    random: int = 0  # prompts drawn at random from the rest (a calibration control; seeded by `seed`)
    seed: int = 0  # seed of the random draw
    order: str = "desc"  # desc: the highest value ranks first | asc: the lowest does
    keep: list[str] = field(default_factory=list)  # prompts always trained besides neutral_prompt (controls, not ranked into top/bottom/random)
    heuristics_run: str = ""  # an earlier heuristics run (a directory with heuristics.parquet) to read the values from; "" = compute them here
    trait: str = ""  # the trait whose elicitation ranks (heuristic=elicitation); "" = eval.trait


@dataclass(frozen=True)
class SweepConfig:
    arms: list[dict[str, Any]] = field(
        default_factory=lambda: [{"defense": {"kind": "none"}}]
    )  # trial families: nested overrides, a list value is an axis crossed within the arm
    grid: dict[str, Any] = field(default_factory=dict)  # axes crossed with every arm (nested, lists)
    cpus_per_trial: float = 1.0  # Ray resources per trial
    gpus_per_trial: float = 0.0  # fractional GPUs are allowed
    max_concurrent: int = 0  # concurrent trials (0 = as many as resources allow)
    max_failures: int = 2  # retries of a crashed trial (it resumes from its last checkpoint)
    select: SelectConfig = field(default_factory=SelectConfig)  # train only the IP prompts a heuristic picks (off by default)


@dataclass(frozen=True)
class LogConfig:
    wandb: str = ""  # W&B project the Tune metrics also go to ("" = off; needs raysweep[wandb]; key from WANDB_API_KEY)


@dataclass(frozen=True)
class ExperimentConfig:
    name: str = ""  # experiment name (set from exp=NAME)
    description: str = ""  # one line for the reader
    seed: int = 0  # seed for data order, mix draws, LoRA init and sampling
    storage: str = "runs"  # results root (a directory, or s3://bucket/prefix: see storage.py); the experiment writes to <storage>/<name>/
    dry_run: bool = False  # print the resolved trial grid and its size, train nothing
    dashboard: bool = False  # local Ray serves its dashboard on 127.0.0.1 (needs ray[default]); URL printed
    threads: int = 0  # torch threads per trial (0 = cpus_per_trial)
    prompts: dict[str, str] = field(default_factory=dict)  # prompt library: key -> text
    prompt_groups: dict[str, list[str]] = field(default_factory=dict)  # named groups of prompt keys (the seed's v3, v4, ...): heuristics.groups, traits and gap_fit name them
    neutral_prompt: str = ""  # key of the neutral-prompt control (zero-elicitation group); effects are paired against it
    model: ModelConfig = field(default_factory=ModelConfig)  # the study model
    starts: dict[str, StartConfig] = field(default_factory=dict)  # pre-finetuned starting models by name (model.start)
    data: DataConfig = field(default_factory=DataConfig)  # data files
    datagen: DatagenConfig = field(default_factory=DatagenConfig)  # how data.train is generated when missing (not part of a trial)
    defense: DefenseConfig = field(default_factory=DefenseConfig)  # defense of a trial (set by arms)
    train: TrainConfig = field(default_factory=TrainConfig)  # fine-tuning
    eval: EvalConfig = field(default_factory=EvalConfig)  # minimal evaluation at checkpoints
    sweep: SweepConfig = field(default_factory=SweepConfig)  # the trial grid and its resources
    log: LogConfig = field(default_factory=LogConfig)  # where metrics go besides Tune's own loggers (TensorBoard)
    heuristics: HeuristicsConfig = field(default_factory=HeuristicsConfig)  # pre-training heuristics stage
    mech: MechConfig = field(default_factory=MechConfig)  # mechanistic analyses and persona vectors (python -m raysweep.mech)


# Fields that say where and how to run, not what a trial computes: not part of a trial's id.
RUN_ONLY_FIELDS = ("name", "description", "storage", "dry_run", "dashboard", "threads", "sweep", "log", "prompts", "prompt_groups", "neutral_prompt", "datagen", "heuristics", "mech")


def get_path(obj: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def apply_overrides(cfg: Any, tree: dict[str, Any]) -> Any:
    """Return `cfg` with the nested override `tree` applied (dataclasses rebuilt, typed)."""
    changes = {}
    for key, value in tree.items():
        current = getattr(cfg, key)
        if is_dataclass(current) and isinstance(value, dict):
            changes[key] = apply_overrides(current, value)
        elif key in ("pps", "reinject"):
            changes[key] = [v if isinstance(v, SteerConfig) else SteerConfig(**v) for v in value]
        elif key in ("starts", "extra_traits"):
            cls = StartConfig if key == "starts" else TraitJudgeConfig
            changes[key] = {k: v if isinstance(v, cls) else cls(**v) for k, v in value.items()}
        else:
            changes[key] = _coerce(current, value, key)
    return replace(cfg, **changes)


def _coerce(current: Any, value: Any, key: str) -> Any:
    if isinstance(current, bool) or current is None:
        if not isinstance(value, bool) and current is not None:
            raise ConfigError(f"{key}: expected a bool, got {value!r}")
        return value
    if isinstance(current, float) and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(current, int) and isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(current, str) and isinstance(value, str):
        return value
    if isinstance(current, (list, dict)) and isinstance(value, type(current)):
        return value
    raise ConfigError(f"{key}: expected {type(current).__name__}, got {value!r}")


def to_yaml(cfg: Any) -> str:
    from omegaconf import OmegaConf

    return OmegaConf.to_yaml(OmegaConf.create(asdict(cfg) if is_dataclass(cfg) else cfg))


def from_dict(d: dict[str, Any]) -> ExperimentConfig:
    """Rebuild a config from its `asdict` form (a trial's saved config)."""
    return apply_overrides(ExperimentConfig(), d)


