"""Loading an experiment: Hydra composes experiments/<exp>.yaml over the schema's defaults
with the command-line overrides; the result is validated (each error names its key) and
turned into frozen dataclasses once, at the entry point. Also the stages' shared CLI."""

from __future__ import annotations

import re
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Any, Callable

from ..errors import ConfigError
from ..paths import data_root
from .backend import resolve_backend
from .schema import EvalConfig, ExperimentConfig, LogConfig, TraitJudgeConfig, get_path

REPO_ROOT = Path(__file__).resolve().parents[2]


def experiments_dir() -> Path:
    """The experiment files: ./experiments if present, else the ones next to the package."""
    local = Path.cwd() / "experiments"
    return local if local.is_dir() else REPO_ROOT / "experiments"


def available_experiments(directory: Path | None = None) -> list[str]:
    directory = directory or experiments_dir()
    # Files starting with "_" hold shared defaults for a family of experiments.
    return sorted(p.stem for p in directory.glob("*.yaml") if not p.stem.startswith("_"))


def _thaw(node: Any) -> None:
    """OmegaConf marks frozen-dataclass nodes read-only; composition must write into them."""
    from omegaconf import DictConfig, ListConfig

    node._set_flag("readonly", None)
    children = node.keys() if isinstance(node, DictConfig) else range(len(node))
    for key in children:
        child = node._get_node(key)
        if isinstance(child, (DictConfig, ListConfig)):
            _thaw(child)
        else:
            child._set_flag("readonly", None)


def _error_text(exc: BaseException) -> str:
    """Hydra wraps OmegaConf's errors; the innermost ones name the key."""
    parts, seen = [], set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        for line in str(exc).strip().splitlines():
            line = line.strip()
            noise = ("$VALUE", "reference_type", "object_type", "To append", "could not convert")
            if line and line not in parts and not any(n in line for n in noise):
                parts.append(line)
        exc = exc.__cause__ or exc.__context__
    return "\n".join(parts)


def _normalise_override(arg: str) -> str:
    # Grid and arm axes are open dictionaries: adding an axis must not need Hydra's `+`.
    if arg.startswith(("sweep.grid.", "sweep.arms")) and not arg.startswith("+"):
        return "++" + arg
    # A trait's judge or rubric (eval.extra_traits.playful.judge=local): OmegaConf can only merge
    # a new entry of a dict of dataclasses, so the override becomes a merge of that entry.
    m = re.fullmatch(r"\+{0,2}eval\.extra_traits\.(\w+)(?:\.(\w+))?=(.*)", arg, re.S)
    if m:
        trait, key, value = m.groups()
        quoted = "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
        return f"+eval.extra_traits={{{trait}:{{{key}:{quoted}}}}}" if key else f"+eval.extra_traits={{{trait}:{value}}}"
    return arg


def load_config(exp: str, overrides: list[str] = (), directory: Path | None = None) -> ExperimentConfig:
    """Compose experiments/<exp>.yaml over the defaults with Hydra overrides; validate; freeze."""
    from hydra import compose, initialize_config_dir
    from hydra.core.config_store import ConfigStore
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    directory = (directory or experiments_dir()).resolve()
    names = available_experiments(directory)
    if exp not in names:
        raise ConfigError(
            f"unknown experiment {exp!r}: no {directory / (exp + '.yaml')}. "
            f"Available: {', '.join(names) or '(none)'}"
        )
    schema = OmegaConf.structured(ExperimentConfig)
    _thaw(schema)
    ConfigStore.instance().store(name="base", node=schema)
    # ${neg:x} = -x: a negative-steering arm reuses the coefficient of the positive one.
    OmegaConf.register_new_resolver("neg", lambda x: -float(x), replace=True)
    # ${data:inoculation/rephrasings}: a file of the seeds' public data, under the data root.
    OmegaConf.register_new_resolver("data", lambda rel: str(data_root() / str(rel)), replace=True)
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(directory), version_base=None):
            cfg = compose(config_name=exp, overrides=[_normalise_override(o) for o in overrides])
        cfg.name = exp
        obj = OmegaConf.to_object(cfg)
    except Exception as exc:  # Hydra/OmegaConf errors: report the key, not a traceback
        raise ConfigError(f"in experiment {exp!r} ({directory / (exp + '.yaml')}):\n{_error_text(exc)}") from None
    finally:
        GlobalHydra.instance().clear()
    if not isinstance(obj, ExperimentConfig):
        raise ConfigError(f"{directory / (exp + '.yaml')} must start with `defaults: [base, _self_]`")
    validate(obj)
    return obj


CHOICES = {
    "defense.kind": ("none", "ip", "pps"),
    "defense.ip.mode": ("fixed", "mix"),
    "defense.ip.placement": ("user_prefix", "user_suffix", "system"),
    "defense.grad.mode": ("none", "attenuate", "amplify", "neutralize"),
    "eval.added_back_placement": ("ip", "user_prefix", "user_suffix", "system"),
    "train.schedule": ("linear", "cosine", "constant"),
    "train.checkpoints": ("pow2", "explicit", "final"),
    "model.dtype": ("float32", "bfloat16", "float16"),
    "eval.backend": ("transformers", "vllm", "auto"),
}


def validate(cfg: ExperimentConfig) -> None:
    """Checks that types alone cannot express; each error names its key."""
    for key, allowed in CHOICES.items():
        value = get_path(cfg, key)
        if value not in allowed:
            raise ConfigError(f"{key}={value!r} is not one of {', '.join(allowed)}")
    _check_conditions(cfg.eval)
    resolve_backend(cfg.eval.backend)  # eval.backend=vllm without vllm installed: ConfigError
    check_logging(cfg.log)  # log.wandb without wandb installed: ConfigError
    _check_judge(cfg.eval)
    if cfg.train.batch_size < 1 or cfg.train.grad_accum < 1:
        raise ConfigError("train.batch_size and train.grad_accum must be >= 1")
    if cfg.defense.grad.mode != "none" and not cfg.defense.grad.vector:
        raise ConfigError(f"defense.grad.mode={cfg.defense.grad.mode!r} needs defense.grad.vector")
    if any(l < 1 for l in cfg.defense.grad.layers):
        raise ConfigError(f"defense.grad.layers={list(cfg.defense.grad.layers)}: layers are 1-based decoder layers")
    from ..heuristics.config import validate as validate_heuristics

    validate_heuristics(cfg.heuristics)
    from ..mech.config import validate as validate_mech

    validate_mech(cfg.mech, cfg.prompts)
    if cfg.neutral_prompt and cfg.neutral_prompt not in cfg.prompts:
        raise ConfigError(f"neutral_prompt={cfg.neutral_prompt!r} is not a key of `prompts`")
    for i, arm in enumerate(cfg.sweep.arms):
        _check_override_tree(arm, ExperimentConfig, f"sweep.arms[{i}]")
    _check_override_tree(cfg.sweep.grid, ExperimentConfig, "sweep.grid")


CONDITIONS = ("default", "training", "added_back", "reinjected")  # plus system:<text>


def _check_conditions(e: EvalConfig) -> None:
    for i, cond in enumerate(e.conditions):
        if cond not in CONDITIONS and not cond.startswith("system:"):
            raise ConfigError(
                f"eval.conditions[{i}]={cond!r}: unknown condition ({' | '.join(CONDITIONS)} | system:<text>)"
            )
        if cond.startswith("system:") and not cond[len("system:"):].strip():
            raise ConfigError(f"eval.conditions[{i}]={cond!r}: system:<text> needs a system prompt after the colon")
    if len(set(e.conditions)) != len(e.conditions):
        raise ConfigError(f"eval.conditions={list(e.conditions)}: a condition is listed twice")


def _check_judge(e: EvalConfig) -> None:
    """Judge settings. The key's value is never echoed for judge_api_key_env: it might be a key."""
    from ..eval.judges import JUDGES

    if e.judge not in JUDGES:
        raise ConfigError(f"eval.judge={e.judge!r}: registered judges are {', '.join(JUDGES)}")
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", e.judge_api_key_env):
        raise ConfigError("eval.judge_api_key_env must be the NAME of an environment variable "
                          "(letters, digits, _), not the key itself")
    for key, value, ok, rule in (
        ("judge_min_mass", e.judge_min_mass, 0.0 <= e.judge_min_mass <= 1.0, "in [0, 1]"),
        ("judge_concurrency", e.judge_concurrency, e.judge_concurrency >= 1, ">= 1"),
        ("judge_retries", e.judge_retries, e.judge_retries >= 0, ">= 0"),
        ("judge_timeout", e.judge_timeout, e.judge_timeout > 0, "> 0"),
        ("em_coherence_min", e.em_coherence_min, 0.0 <= e.em_coherence_min <= 100.0, "in [0, 100]"),
        ("em_alignment_max", e.em_alignment_max, 0.0 <= e.em_alignment_max <= 100.0, "in [0, 100]"),
    ):
        if not ok:
            raise ConfigError(f"eval.{key}={value!r} must be {rule}")
    if e.em and e.judge == "langid":
        raise ConfigError("eval.em=true scores coherence and alignment with eval.judge: use logprob or local, not langid")
    from ..eval.judges import LANGUAGES

    for trait, spec in {e.trait: TraitJudgeConfig(), **e.extra_traits}.items():
        where = f"eval.extra_traits.{trait}" if trait in e.extra_traits else "eval.trait"
        judge = spec.judge or e.judge
        if judge not in JUDGES:
            raise ConfigError(f"{where}.judge={judge!r}: registered judges are {', '.join(JUDGES)}")
        if judge == "langid" and trait.lower() not in LANGUAGES and trait.lower() not in LANGUAGES.values():
            raise ConfigError(f"{where}: {trait!r} is scored by the langid judge, which scores languages "
                              f"({', '.join(LANGUAGES)}); give it a rubric judge ({where}.judge=logprob or local)")
        if judge == "langid" and spec.rubric:
            raise ConfigError(f"{where}.rubric: the langid judge takes no rubric (use logprob or local)")


def check_logging(log: LogConfig) -> None:
    """log.wandb needs the wandb package (the optional extra raysweep[wandb])."""
    import importlib.util

    if log.wandb and importlib.util.find_spec("wandb") is None:
        raise ConfigError(f"log.wandb={log.wandb!r} needs the wandb package: pip install 'raysweep[wandb]'")


def validate_trial(cfg: ExperimentConfig) -> None:
    """Checks on one resolved trial: every eval condition has what it adds at eval time."""
    e, d = cfg.eval, cfg.defense
    if "added_back" in e.conditions and not (e.added_back or d.ip.text):
        raise ConfigError(
            "eval.conditions has added_back, but this trial has no inoculation prompt to add back: "
            "set eval.added_back to the text to add"
        )
    if "reinjected" in e.conditions and not (e.reinject or d.pps):
        raise ConfigError(
            "eval.conditions has reinjected, but this trial has no steering of its own (defense.pps): "
            "set eval.reinject to the vectors to add"
        )
    start = cfg.model.start
    if start:
        if start not in cfg.starts and not (Path(start) / "adapter_config.json").is_file():
            known = ", ".join(sorted(cfg.starts)) or "(none)"
            raise ConfigError(f"model.start={start!r} is neither a key of `starts` (known: {known}) "
                              "nor a PEFT adapter directory (with adapter_config.json)")
        if start in cfg.starts and not cfg.starts[start].train:
            raise ConfigError(f"starts.{start}.train: the pre-finetuning data file is not set")
        if resolve_backend(e.backend) == "vllm":
            raise ConfigError(f"model.start={start!r} needs eval.backend=transformers: the vLLM backend "
                              "serves one base model, and each starting model is a different one")


def _check_override_tree(tree: Any, cls: type, where: str) -> None:
    if not isinstance(tree, dict):
        raise ConfigError(f"{where} must be a mapping of config keys")
    names = {f.name: f for f in fields(cls)}
    for key, value in tree.items():
        if key not in names:
            raise ConfigError(f"{where}.{key}: no such config key in {cls.__name__}")
        if key == "sweep":
            raise ConfigError(f"{where}.sweep: the sweep cannot be an axis of itself")
        sub = _field_class(cls, key)
        if sub is not None and isinstance(value, dict):
            _check_override_tree(value, sub, f"{where}.{key}")


def _field_class(cls: type, name: str) -> type | None:
    import typing

    hint = typing.get_type_hints(cls)[name]
    return hint if is_dataclass(hint) else None


# ---------------------------------------------------------------------------------------------
# Trials


def parse_exp_args(argv: list[str], usage: str) -> tuple[str, list[str]]:
    """(experiment name, overrides) of a command line `exp=NAME [key=value ...]`."""
    exp = [a for a in argv if a.startswith("exp=")]
    if len(exp) != 1:
        raise ConfigError(f"name exactly one experiment with exp=NAME\n{usage}")
    return exp[0].split("=", 1)[1], [a for a in argv if not a.startswith("exp=")]


def stage_main(argv: list[str], usage: str, stage: Callable[[ExperimentConfig], int | None]) -> int:
    """The CLI of a stage (`python -m raysweep.<stage> exp=NAME [key=value ...]`): load the
    experiment and run `stage` on it; a ConfigError is printed and exits 2."""
    import sys

    try:
        return stage(load_config(*parse_exp_args(argv, usage))) or 0
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
