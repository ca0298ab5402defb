"""A trial's identity: the part of its resolved config that decides what it computes, with
files named by path and content digest and data-root paths named relative to the root."""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ..paths import data_root
from .backend import vllm_available
from .schema import RUN_ONLY_FIELDS, ExperimentConfig


# eval settings that change how results are computed or fetched, never what: the judge's
# transport settings do not change its scores, and the backends agree on greedy answers and
# logprobs (sampled answers: eval_backend).
EVAL_RUN_ONLY = ("backend", "judge_api_key_env", "judge_concurrency", "judge_retries", "judge_timeout", "judge_cache")


def eval_backend(cfg: ExperimentConfig) -> str:
    """The eval backend as it decides the answers: "vllm" when eval.backend resolves to vLLM
    and answers are sampled (vLLM's sampler draws other samples than transformers' from the
    same seeds), else "" (greedy answers are the same on both, and so are logprobs within 1e-4).
    `auto` resolves by what is installed, as config.backend.resolve_backend does."""
    name = cfg.eval.backend
    vllm = name == "vllm" or (name == "auto" and vllm_available())
    return "vllm" if vllm and cfg.eval.temperature > 0 else ""


def trial_fields(cfg: ExperimentConfig) -> dict[str, Any]:
    """The part of a resolved config that decides what a trial computes."""
    d = asdict(cfg)
    for key in RUN_ONLY_FIELDS:
        d.pop(key)
    if not d["eval"]["extra_traits"]:  # none: ids stay those written before the field existed
        d["eval"].pop("extra_traits")
    elif not any(t["judge"] for t in d["eval"]["extra_traits"].values()):  # all by eval.judge: ids as when
        d["eval"]["extra_traits"] = {k: t["rubric"] for k, t in d["eval"]["extra_traits"].items()}  # it was trait -> rubric
    if d["defense"]["grad"]["mode"] == "none":  # unused: ids stay those of configs written before it existed
        d["defense"].pop("grad")
    d["model"]["name"] = model_key(d["model"]["name"])
    if not d["model"]["start"]:  # likewise for the base model as start
        d["model"].pop("start")
    else:
        d["model"]["start"] = start_key(cfg)
    if not d["starts"]:
        d.pop("starts")
    unused = {"added_back": ("added_back", "added_back_placement"), "reinjected": ("reinject",)}
    for cond, keys in unused.items():  # settings of an absent condition: ids stay those written before them
        if cond not in d["eval"]["conditions"]:
            for key in keys:
                d["eval"].pop(key)
    for key in EVAL_RUN_ONLY:  # how answers are computed or fetched, not what: ids unchanged
        d["eval"].pop(key)
    if eval_backend(cfg):  # ... except vLLM's sampled answers: a trial of its own
        d["eval"]["backend"] = eval_backend(cfg)
    d["train"].pop("keep_resume")  # what a finished trial keeps on disk, not what it computes: ids unchanged
    for key in ("judge_prompts", "judge_traits_dir"):  # "" = the project's own seed judge / the data root's traits
        if not d["eval"][key]:
            d["eval"].pop(key)
    # vector files: named by path and content, as adapter directories are (start_key)
    for s in [*d["defense"]["pps"], *d["eval"].get("reinject", [])]:
        s["vector"] = vector_key(s["vector"])
    if "grad" in d["defense"]:
        d["defense"]["grad"]["vector"] = vector_key(d["defense"]["grad"]["vector"])
    return _portable(d, f"{data_root()}/")


def _portable(node: Any, root: str) -> Any:
    """Paths under the data root named relative to it (${data:...}), so that a trial's id is
    the same on every machine, wherever its data root is."""
    if isinstance(node, dict):
        return {k: _portable(v, root) for k, v in node.items()}
    if isinstance(node, list):
        return [_portable(v, root) for v in node]
    if isinstance(node, str) and node.startswith(root):
        return "${data:" + node[len(root):] + "}"
    return node


def start_key(cfg: ExperimentConfig) -> str:
    """What names the trial's starting model: a key of `starts` (its recipe is in the config),
    or an adapter directory with its content's digest, so a new file is a new trial."""
    start = cfg.model.start
    return start if not start or start in cfg.starts else f"{start}@{adapter_digest(start)}"


def model_key(name: str) -> str:
    """What names the study model: a GGUF file by its path and content digest (an edited file
    is a new model), any other name (embedded, folder, hub id) as it is."""
    return vector_key(name) if name.endswith(".gguf") else name


def vector_key(path: str) -> str:
    """What names a steering or ablation vector file (defense.pps, defense.grad, eval.reinject)
    in a trial's identity: its path with its content's digest, as start_key names an adapter
    directory, so a vector re-extracted to the same path is a new trial."""
    return f"{path}@{file_digest(path)}" if path else path


def adapter_digest(path: str | Path) -> str:
    """sha256 (12 hex) of a PEFT adapter directory's config and weights; "missing" if absent."""
    return files_digest([Path(path) / "adapter_config.json", *sorted(Path(path).glob("adapter_model.*"))])


def file_digest(path: str | Path) -> str:
    """sha256 (12 hex) of one file's bytes; "missing" if absent."""
    return files_digest([Path(path)])


def files_digest(files: list[Path]) -> str:
    """sha256 (12 hex) of the files' bytes, in order; "missing" if any is absent.

    Every trial of a grid asks for it: the digest is kept per (file, size, mtime), so each
    file is read once per process unless it changes.
    """
    if not all(f.is_file() for f in files):
        return "missing"
    return _digest(tuple((str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in files))


@functools.lru_cache(maxsize=64)
def _digest(files: tuple[tuple[str, int, int], ...]) -> str:
    h = hashlib.sha256()
    for name, _size, _mtime in files:
        with open(name, "rb") as fh:  # streamed: a model file may be gigabytes
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()[:12]


def trial_id(cfg: ExperimentConfig) -> str:
    """Hash of the canonical resolved trial config (not of its position in a grid)."""
    canonical = json.dumps(trial_fields(cfg), sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:12]


