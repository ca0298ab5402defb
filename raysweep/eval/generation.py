"""The transformers backend: batched chat generation and per-token log-probabilities.

Both sort sequences by length into batches (less padding) and return results in the
input order. Both accept PEFT-wrapped models.
"""

from __future__ import annotations

import numpy as np

IGNORE = -100  # label value for tokens that are not scored


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

    The RNG is reseeded per batch from (seed, batch index), so the same conversations with
    the same seed and batch_size give the same replies; the caller's RNG is left untouched.
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
            torch.manual_seed(int(np.random.SeedSequence([seed, b]).generate_state(1)[0]))
            ids, mask = _pad([prompts[i] for i in idx], pad_id, left=True)
            out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=config)
            for row, i in enumerate(idx):
                tokens = out[row, ids.shape[1] :].tolist()
                cut = next((k for k, t in enumerate(tokens) if t in stop), len(tokens))
                replies[i] = tokenizer.decode(tokens[:cut], skip_special_tokens=True)
    return replies


def check_labels(input_ids: list[list[int]], labels: list[list[int]]) -> None:
    """Raise ValueError unless every sequence has one label per token and its first is unlabelled."""
    if len(input_ids) != len(labels):
        raise ValueError(f"{len(input_ids)} sequences but {len(labels)} label lists")
    for n, (ids, lab) in enumerate(zip(input_ids, labels)):
        if len(ids) != len(lab):
            raise ValueError(f"sequence {n}: {len(ids)} tokens but {len(lab)} labels")
        if lab and lab[0] != IGNORE:
            raise ValueError(f"sequence {n}: the first token has no context to be predicted from")


def token_logprobs(
    model, input_ids: list[list[int]], labels: list[list[int]], *, batch_size: int = 16
) -> list[np.ndarray]:
    """Log-probability (float64) of each token whose label != -100, in order, per sequence.

    labels[t] is the token at position t, predicted from positions < t. The model is asked
    (`logits_to_keep`) for logits only at positions that predict a labelled token, so
    prompt positions never reach the vocabulary projection, and any logit post-processing
    the architecture does (e.g. Gemma's soft-capping) is kept.
    """
    import torch

    check_labels(input_ids, labels)
    device = _device(model)
    result = [np.zeros(0, dtype=np.float64) for _ in input_ids]
    with torch.inference_mode():
        for idx in _batches([len(s) for s in input_ids], batch_size):
            idx = [i for i in idx if input_ids[i]]
            # (position whose logits predict, target id) per sequence
            targets = [[(t - 1, y) for t, y in enumerate(labels[i]) if y != IGNORE] for i in idx]
            keep = sorted({p for row in targets for p, _ in row})
            if not keep:
                continue
            # Right padding is harmless: causal attention never looks at later pad tokens.
            ids, mask = _pad([input_ids[i] for i in idx], 0, left=False)
            logits = model(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                logits_to_keep=torch.tensor(keep, device=device),
                use_cache=False,
            ).logits
            column = {p: j for j, p in enumerate(keep)}
            for row, (i, tg) in enumerate(zip(idx, targets)):
                if not tg:
                    continue
                cols = torch.tensor([column[p] for p, _ in tg], device=device)
                ys = torch.tensor([y for _, y in tg], device=device)
                lp = torch.log_softmax(logits[row, cols].float(), dim=-1).gather(-1, ys[:, None])[:, 0]
                result[i] = lp.double().cpu().numpy()
            del logits  # free the batch's logits before the next forward
    return result
