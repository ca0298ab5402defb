"""Expand an experiment's arms and grid into resolved trial configs, each with its id."""

from __future__ import annotations

import itertools
import typing
from dataclasses import dataclass, fields, is_dataclass, replace
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..config.identity import trial_id
from ..config.load import validate_trial
from ..config.schema import DefenseConfig, ExperimentConfig, IPConfig, SteerConfig, SweepConfig, apply_overrides


@dataclass(frozen=True)
class Trial:
    id: str  # hash of the resolved trial config
    label: str  # short human name: control, <prompt>/<mode>, pps:..., plus axis values
    axes: dict[str, Any]  # dotted key -> value of every arm/grid axis and arm setting
    config: ExperimentConfig  # the resolved config the trial runs


def _is_list_field(cls: type, name: str) -> bool:
    hint = typing.get_type_hints(cls)[name]
    return typing.get_origin(hint) is list


def _axes(tree: dict[str, Any], cls: type, prefix: str = "") -> list[tuple[str, list[Any]]]:
    """Flatten a nested override tree into (dotted key, values); scalars become one-value axes.

    A list value is an axis. For fields that are lists themselves (target_modules,
    eval.conditions, defense.pps) an axis is a list of lists.
    """
    out = []
    hints = {f.name for f in fields(cls)}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        sub = typing.get_type_hints(cls).get(key) if key in hints else None
        if is_dataclass(sub) and isinstance(value, dict):
            out += _axes(value, sub, dotted + ".")
        elif isinstance(value, list) and not _is_list_field(cls, key):
            out.append((dotted, value))
        elif isinstance(value, list) and value and all(isinstance(v, list) for v in value):
            out.append((dotted, value))
        else:
            out.append((dotted, [value]))
    return out


def _nest(dotted: str, value: Any) -> dict[str, Any]:
    head, _, rest = dotted.partition(".")
    return {head: _nest(rest, value) if rest else value}


def _merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    out = dict(a)
    for key, value in b.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def resolve(cfg: ExperimentConfig) -> ExperimentConfig:
    """Fill derived values so a trial's config is self-contained (prompt text, pool path)."""
    ip = cfg.defense.ip
    # Settings of an unused defense must not change a trial's identity.
    if cfg.defense.kind == "none":
        return replace(cfg, defense=DefenseConfig(grad=cfg.defense.grad))
    if cfg.defense.kind == "pps":
        if not cfg.defense.pps:
            raise ConfigError("defense.kind=pps needs at least one entry in defense.pps")
        return replace(cfg, defense=replace(cfg.defense, ip=IPConfig()))
    text = ip.text
    if not text:
        if ip.prompt not in cfg.prompts:
            known = ", ".join(sorted(cfg.prompts)) or "(none)"
            raise ConfigError(f"defense.ip.prompt={ip.prompt!r} is not a key of `prompts` (known: {known})")
        text = cfg.prompts[ip.prompt]
    pool = ip.pool if ip.mode == "mix" else ""
    if ip.mode == "mix" and not pool:
        pool = str(Path(cfg.data.rephrasings_dir) / f"{ip.prompt}.jsonl")
    defense = replace(cfg.defense, ip=replace(ip, text=text, pool=pool), pps=[])
    return replace(cfg, defense=defense)


def label(cfg: ExperimentConfig) -> str:
    g = cfg.defense.grad
    grad = "" if g.mode == "none" else f"+grad:{g.mode}:{Path(g.vector).stem}"
    return _defense_label(cfg) + grad


def _defense_label(cfg: ExperimentConfig) -> str:
    d = cfg.defense
    if d.kind == "none":
        return "control"
    if d.kind == "ip":
        where = {"user_prefix": "", "user_suffix": "@suffix"}.get(d.ip.placement, "@system")
        return f"{d.ip.prompt or 'custom'}/{d.ip.mode}{where}"
    return "pps:" + "+".join(f"{Path(s.vector).stem}@L{s.layer}x{s.coef:g}" for s in d.pps)


def _short(key: str, value: Any) -> str:
    """An axis value in a label: a file path by its stem, the base model as start by "base"."""
    if key == "model.start" and value == "":
        return "base"
    if isinstance(value, str) and "/" in value:
        return Path(value).stem
    return str(value)


def ip_prompt_axis(arm: dict[str, Any]) -> list[Any] | None:
    """The arm's `defense.ip.prompt` list (an axis), or None when the arm has no such list."""
    defense = arm.get("defense")
    ip = defense.get("ip") if isinstance(defense, dict) else None
    prompt = ip.get("prompt") if isinstance(ip, dict) else None
    return prompt if isinstance(prompt, list) else None


def with_prompt_groups(arm: dict[str, Any], cfg: ExperimentConfig) -> dict[str, Any]:
    """`arm` with each name of `prompt_groups` in its IP prompt axis replaced by the group's
    prompt keys, in order, each once (a name that is also a key of `prompts` stays that prompt)."""
    axis = ip_prompt_axis(arm)
    if axis is None:
        return arm
    keys = [k for name in axis for k in (cfg.prompt_groups[name] if isinstance(name, str) and name in cfg.prompt_groups
                                         and name not in cfg.prompts else [name])]
    return _merge(arm, {"defense": {"ip": {"prompt": list(dict.fromkeys(keys))}}})


def expand(cfg: ExperimentConfig) -> list[Trial]:
    """Every trial of the experiment: for each arm, the product of its axes and the grid's.

    An IP prompt axis may name groups of `prompt_groups` (with_prompt_groups)."""
    grid_axes = _axes(cfg.sweep.grid, ExperimentConfig)
    trials: dict[str, Trial] = {}
    for arm in cfg.sweep.arms:
        arm = with_prompt_groups(arm, cfg)
        arm_axes = _axes(arm, ExperimentConfig)
        all_axes = arm_axes + grid_axes
        keys = [k for k, _ in all_axes]
        for values in itertools.product(*(v for _, v in all_axes)):
            tree: dict[str, Any] = {}
            for key, value in zip(keys, values):
                tree = _merge(tree, _nest(key, value))
            try:
                t = resolve(apply_overrides(cfg, tree))
                validate_trial(t)
            except ConfigError as exc:
                raise ConfigError(f"sweep arm {arm}: {exc}") from None
            own = {t.model.start: t.starts[t.model.start]} if t.model.start in t.starts else {}
            t = replace(t, sweep=SweepConfig(arms=[], grid={}), starts=own)  # other starts: not this trial's identity
            tid = trial_id(t)
            varying = {k: v for (k, vals), v in zip(all_axes, values) if len(vals) > 1 or k in dict(grid_axes)}
            extra = ",".join(f"{k.split('.')[-1]}={_short(k, v)}" for k, v in varying.items() if not k.startswith("defense."))
            name = label(t) + (f"[{extra}]" if extra else "")
            trials.setdefault(tid, Trial(tid, name, dict(zip(keys, values)), t))
    return list(trials.values())


def start_trial(cfg: ExperimentConfig) -> Trial | None:
    """The trial that pre-finetunes `cfg`'s starting model when model.start is a key of
    `starts` (001 Fig. 2), else None. It is a plain trial of the same experiment: no defense,
    the start's data and steps, the experiment's other train and eval settings, evaluated
    under `default` at its first and last step. Trials sharing a start share this trial."""
    name = cfg.model.start
    if name not in cfg.starts:
        return None
    s = cfg.starts[name]
    train = replace(cfg.train, max_steps=s.max_steps or cfg.train.max_steps, lr=s.lr or cfg.train.lr,
                    checkpoints="final", checkpoint_steps=[])
    c = replace(cfg, model=replace(cfg.model, start=""), starts={}, defense=DefenseConfig(),
                data=replace(cfg.data, train=s.train, n_train=s.n_train), train=train,
                eval=replace(cfg.eval, conditions=["default"], steps=[]), sweep=SweepConfig(arms=[], grid={}))
    return Trial(trial_id(c), f"start:{name}", {"model.start": name}, c)


def start_trials(trials: list[Trial]) -> list[Trial]:
    """The distinct pre-finetuning trials the sweep's trials start from."""
    out = {}
    for t in trials:
        st = start_trial(t.config)
        if st is not None:
            out.setdefault(st.id, st)
    return list(out.values())


def check_inputs(trials: list[Trial]) -> None:
    """Read every input a trial needs before any training: a bad file fails here, naming it."""
    from ..data import read_chat, read_pool, read_questions

    checked: set[tuple[str, str]] = set()

    def once(key: str, path: str, read, cfg: ExperimentConfig | None = None) -> None:
        if not path:
            raise ConfigError(f"{key} is not set: this experiment takes its data as a parameter ({key}=FILE)")
        if (key, path) not in checked:
            try:
                read(path)
            except ConfigError as exc:
                hint = how_to_get(key, path, cfg) if cfg is not None and not Path(path).exists() else ""
                raise ConfigError(f"{key}: {exc}" + (f"\n{hint}" if hint else "")) from None
            checked.add((key, path))

    for t in trials:
        c = t.config
        once("data.train", c.data.train, read_chat, c)
        if c.model.start in c.starts:
            once(f"starts.{c.model.start}.train", c.starts[c.model.start].train, read_chat)
        once("data.questions", c.data.questions, read_questions, c)
        if c.eval.heldout_logprob and c.data.heldout:
            once("data.heldout", c.data.heldout, read_chat, c)
        if c.defense.kind == "ip" and c.defense.ip.mode == "mix":
            once("defense.ip.pool", c.defense.ip.pool, read_pool, c)
        for s in c.defense.pps:
            once("defense.pps", f"{s.vector}|{s.key}|{s.layer}|{c.model.name}", lambda _: _check_vector(s, c.model.name))
        for s in c.eval.reinject if "reinjected" in c.eval.conditions else []:
            once("eval.reinject", f"{s.vector}|{s.key}|{s.layer}|{c.model.name}", lambda _: _check_vector(s, c.model.name))
        g = c.defense.grad
        if g.mode != "none":
            for layer in g.layers or [1]:
                s = SteerConfig(vector=g.vector, key=g.key, layer=layer)
                once("defense.grad", f"{g.vector}|{g.key}|{layer}|{c.model.name}", lambda _: _check_vector(s, c.model.name))


def how_to_get(key: str, path: str, cfg: ExperimentConfig) -> str:
    """The command that makes a missing input: `fetch` for a file of the seeds' public data
    (under the data root), `generate` for training data, `rephrase` for a rephrasing pool."""
    import shlex

    from ..data.fetch import load_registry
    from ..paths import DATA_ENV, data_root

    root = data_root()
    try:
        rel = Path(path).absolute().relative_to(root).as_posix()
    except ValueError:
        rel = None
    if rel is not None:
        groups = sorted({s.group for s in load_registry() if s.path == rel or s.path.startswith(rel + "/")})
        if groups:
            return (f"it is the seeds' public data: fetch it into the data root ({root}) with "
                    f"`python -m raysweep.data fetch {' '.join(groups)}`, or set {DATA_ENV} to a copy")
    if key == "data.train":
        d = cfg.datagen
        cmd = ["python", "-m", "raysweep.data", "generate", "--questions", "INSTRUCTIONS.jsonl", "--out", path]
        if d.system_prompt:
            cmd += ["--datagen-prompt", d.system_prompt]
        if d.judge:
            cmd += ["--judge", d.judge, "--trait", d.trait, "--threshold", f"{d.threshold:g}"]
        return (f"generate it (answers to your instructions under the experiment's data-generation prompt, "
                f"on a local model, or an endpoint with --backend endpoint --model NAME): {shlex.join(cmd)}")
    if key == "defense.ip.pool":
        ip = cfg.defense.ip
        cmd = ["python", "-m", "raysweep.data", "rephrase", "--prompt", ip.text, "--n", "1000", "--out", path]
        return f"make the pool of {ip.prompt!r}: {shlex.join(cmd)}"
    return ""


def _check_vector(s, model_name: str) -> None:
    from transformers import AutoConfig

    from ..train.defenses import read_vector
    from ..train.models import resolve_model

    if not Path(s.vector).is_file():  # before the model's config, which may need the network
        raise ConfigError(f"vector file not found: {s.vector}")
    try:
        mc = AutoConfig.from_pretrained(resolve_model(model_name)).get_text_config()
    except OSError as exc:  # not cached and no network, or no such model
        raise ConfigError(f"model.name={model_name!r}: cannot read the model's config to check the vector "
                          f"against it ({str(exc).strip().splitlines()[0]})") from None
    read_vector(s, mc.num_hidden_layers, mc.hidden_size)
