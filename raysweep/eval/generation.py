"""The transformers backend: batched chat generation and per-token log-probabilities.

Both sort sequences by length into batches (less padding) and return results in the
input order. Both accept PEFT-wrapped models.
"""

from __future__ import annotations

import numpy as np


def _device(model):
    return next(model.parameters()).device


def _batches(lengths: list[int], batch_size: int) -> list[list[int]]:
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    # Longest first, so an out-of-memory batch fails at once rather than at the end.
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def _pad(seqs: list[list[int]], pad_id: int, left: bool):
    import torch

    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, s in enumerate(seqs):
        span = slice(width - len(s), width) if left else slice(0, len(s))
        ids[row, span] = torch.tensor(s, dtype=torch.long)
        mask[row, span] = 1
    return ids, mask


def stop_token_ids(model, tokenizer) -> list[int]:
    """Token ids that end a reply: the tokenizer's EOS plus the model's generation EOS ids."""
    ids = set()
    generation_config = getattr(model, "generation_config", None)
    for value in (tokenizer.eos_token_id, getattr(generation_config, "eos_token_id", None)):
        if value is not None:
            ids.update([value] if isinstance(value, int) else value)
    if not ids:
        raise ValueError("neither the tokenizer nor the model defines an EOS token")
    return sorted(ids)


def _generation_config(max_new_tokens: int, temperature: float, top_p: float, stop: list[int], pad_id: int):
    from transformers import GenerationConfig

    sample = temperature > 0
    # transformers fills every field left None from the checkpoint's generation_config.json
    # (Qwen ships top_k=20, repetition_penalty=1.05), then from global defaults (top_k=50),
    # so each knob that changes the distribution is pinned. Sampling-only knobs are left
    # unset for greedy decoding: there they are unused, and setting them only warns.
    knobs = dict(temperature=temperature, top_p=top_p, top_k=0, min_p=0.0, typical_p=1.0) if sample else {}
    return GenerationConfig(
        max_new_tokens=max_new_tokens,
        min_length=0,
        num_beams=1,
        do_sample=sample,
        repetition_penalty=1.0,
        no_repeat_ngram_size=0,
        eos_token_id=stop,
        pad_token_id=pad_id,
        **knobs,
    )


def row_seed(seed: int, k: int) -> int:
    """The seed of the k-th part of a sampling run seeded `seed`: batch k here (generate), row k
    of a sampling group on vLLM (engine.py)."""
    return int(np.random.SeedSequence([seed, k]).generate_state(1)[0])


def generate(
    model,
    tokenizer,
    conversations: list[list[dict]],
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int = 0,
    batch_size: int = 16,
) -> list[str]:
    """Reply text for each conversation; greedy when temperature == 0, else seeded sampling.

    The RNG is reseeded per batch from (seed, batch index) (`row_seed`), so the same
    conversations with the same seed and batch_size give the same replies; the caller's RNG
    is left untouched.
    """
    import torch

    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if not conversations:
        return []
    # Render then tokenize without special tokens: templates already add BOS where needed.
    prompts = [
        tokenizer(tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True), add_special_tokens=False)[
            "input_ids"
        ]
        for c in conversations
    ]
    stop = stop_token_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop[0]
    config = _generation_config(max_new_tokens, temperature, top_p, stop, pad_id)
    device = _device(model)
    replies: list[str] = [""] * len(prompts)
    with torch.inference_mode(), torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        for b, idx in enumerate(_batches([len(p) for p in prompts], batch_size)):
            torch.manual_seed(row_seed(seed, b))
            ids, mask = _pad([prompts[i] for i in idx], pad_id, left=True)
            out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=config)
            for row, i in enumerate(idx):
                tokens = out[row, ids.shape[1] :].tolist()
                cut = next((k for k, t in enumerate(tokens) if t in stop), len(tokens))
                replies[i] = tokenizer.decode(tokens[:cut], skip_special_tokens=True)
    return replies


def token_logprobs(
    model, input_ids: list[list[int]], labels: list[list[int]], *, batch_size: int = 16
) -> list[np.ndarray]:
    """Log-probability (float64) of each token whose label != -100, in order, per sequence.

    labels[t] is the token at position t, predicted from positions < t. The scoring kernel
    does the work (`scoring.score_sequences`): `batch_size` sequences per forward, longest
    first; only positions that predict a labelled token reach the LM head, and the
    architecture's logit post-processing (e.g. Gemma's soft-capping) is kept. The numbers
    are the ones recorded before the kernel (tests/test_golden.py), bit for bit: every row
    runs its whole prefix and the label is read from torch.log_softmax.
    """
    from .scoring import score_sequences

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    longest = max((len(s) for s in input_ids), default=1)
    return score_sequences(model, input_ids, labels, token_budget=batch_size * max(1, longest), max_rows=batch_size,
                           share_prefix=False, torch_log_softmax=True)
