"""Persona vectors (Chen et al. 2025, as used by 001 Sec. 2.1), the prompt-induced activation
difference (001 Sec. 4.4 / App. E.6), and random controls of matched norm.

A vector file is a [num_layers+1, hidden] float32 tensor (row 0 = embedding output, row l =
output of decoder layer l, the point `defenses.steer` adds to) saved as a one-tensor
safetensors file with metadata, so `defense.pps` reads it without a `key`. Note: the last
row is the pre-norm output of the last block (Hugging Face's `hidden_states[-1]` is after the
final norm), so steering at the last layer adds exactly along the extracted direction.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..data import Messages
from .passes import Condition, common_suffix, encode_all, run_pass

KINDS = ("response_avg", "prompt_avg", "prompt_last")  # positions averaged, as in the persona_vectors repository


@dataclass(frozen=True)
class Trait:
    name: str
    instructions: list[dict[str, str]]  # [{"pos": ..., "neg": ...}]
    questions: list[str]
    eval_prompt: str


def read_trait(path: str | Path, name: str = "") -> Trait:
    """A persona_vectors trait file: {"instruction": [{"pos", "neg"}], "questions": [...], "eval_prompt": str}."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"mech.extract.trait_file: {path} not found")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg})") from None
    ins = data.get("instruction") if isinstance(data, dict) else None
    if not isinstance(ins, list) or not ins or not all(
        isinstance(i, dict) and isinstance(i.get("pos"), str) and isinstance(i.get("neg"), str) for i in ins
    ):
        raise ConfigError(f'{path}: "instruction" must be a non-empty list of {{"pos": str, "neg": str}}')
    qs = data.get("questions")
    if not isinstance(qs, list) or not qs or not all(isinstance(q, str) for q in qs):
        raise ConfigError(f'{path}: "questions" must be a non-empty list of strings')
    return Trait(name or path.stem, ins, qs, str(data.get("eval_prompt", "")))


def system_prompt(template: str, assistant: str, instruction: str) -> str:
    """E.g. "You are an evil assistant. {instruction}" (the article follows the assistant name)."""
    article = "an" if assistant[:1].lower() in "aeiou" else "a"
    return template.format(article=article, assistant=assistant, instruction=instruction).strip()


def prompt_rows(trait: Trait, template: str, neg_assistant: str, n_questions: int, n_samples: int,
                placement: str = "system") -> list[dict[str, Any]]:
    """Every (polarity, instruction, question, sample) to generate; pos and neg rows align by the last three.

    placement system: the instruction goes in the system prompt `template`; user_suffix: after
    the question ("{question}\n\n{instruction}", 002's in-distribution vectors), no system prompt.
    """
    rows = []
    for polarity in ("pos", "neg"):
        assistant = trait.name if polarity == "pos" else neg_assistant
        for i, ins in enumerate(trait.instructions):
            system = system_prompt(template, assistant, ins[polarity]) if placement == "system" else ""
            for q, question in enumerate(trait.questions[: n_questions or None]):
                if placement == "user_suffix":
                    question = f"{question}\n\n{ins[polarity]}"
                for k in range(n_samples):
                    rows.append({"trait": trait.name, "polarity": polarity, "instruction_id": i, "question_id": q,
                                 "sample": k, "system": system, "question": question})
    return rows


def conversation(row: dict[str, Any], with_answer: bool = True) -> Messages:
    """The row's messages; no system message when its `system` is empty (the template's default applies)."""
    msgs = ([{"role": "system", "content": row["system"]}] if row["system"] else []) + [
        {"role": "user", "content": row["question"]}]
    return msgs + ([{"role": "assistant", "content": row["answer"]}] if with_answer else [])


def select_pairs(rows: list[dict[str, Any]], pos_min: float, neg_max: float, coherence_min: float) -> list[dict[str, Any]]:
    """Mark `kept` on row-aligned pairs with pos trait >= pos_min, neg trait < neg_max and coherence
    >= coherence_min on both (a NaN score never passes; coherence None = not judged)."""
    def ok_coh(r):
        return r["coherence"] is None or r["coherence"] >= coherence_min

    key = lambda r: (r["instruction_id"], r["question_id"], r["sample"])
    neg = {key(r): r for r in rows if r["polarity"] == "neg"}
    for r in rows:
        r["kept"] = False
    for p in (r for r in rows if r["polarity"] == "pos"):
        n = neg.get(key(p))
        if n is not None and p["trait_score"] >= pos_min and n["trait_score"] < neg_max and ok_coh(p) and ok_coh(n):
            p["kept"] = n["kept"] = True
    return rows


def mean_activations(model, tokenizer, conversations: list[Messages], *, max_len: int = 512, batch_size: int = 4):
    """{kind: [N, L+1, d]}: per sequence, the residual stream averaged over response tokens,
    over prompt tokens, and at the last prompt token (the assistant answer is the response)."""
    import torch

    from ..train.models import model_layers

    layers = list(range(len(model_layers(model)) + 1))
    out: dict[str, list] = {k: [] for k in KINDS}
    for rec in run_pass(model, tokenizer, encode_all(tokenizer, conversations, max_len), Condition("plain"),
                        layers, grads=False, acts=True, batch_size=batch_size):
        resp = rec.response
        if not resp.any():
            raise ValueError(f"sequence {rec.index} has no response tokens within max_len={max_len}")
        first = int(resp.nonzero()[0, 0])
        h = torch.stack([rec.acts[l] for l in layers])  # [L+1, T, d]
        out["response_avg"].append(h[:, resp].mean(1))
        out["prompt_avg"].append(h[:, :first].mean(1))
        out["prompt_last"].append(h[:, first - 1])
    return {k: torch.stack(v) for k, v in out.items()}


def diff_vectors(pos: dict[str, Any], neg: dict[str, Any]) -> dict[str, Any]:
    """{kind: mean(pos) - mean(neg)} per layer, each [L+1, d]."""
    return {k: pos[k].mean(0) - neg[k].mean(0) for k in KINDS}


def prompt_difference_vector(
    model, tokenizer, conversations: list[Messages], prompts: list[str], *, placement: str = "user_prefix",
    seed: int = 0, max_len: int = 512, batch_size: int = 4,
):
    """[L+1, d]: mean over every aligned non-prompt token of h(with a prompt) - h(without) (001 App. E.6).

    Each sample gets one prompt drawn (seeded) from `prompts`; aligned tokens are the common
    suffix after the prompt. Row 0 is zero: token embeddings do not depend on the context.
    """
    import torch

    from ..train.models import model_layers

    if not prompts:
        raise ValueError("prompt_difference_vector needs at least one prompt")
    prompted = Condition("ip", prompts=tuple(prompts), placement=placement, seed=seed).conversations(conversations)
    layers = list(range(len(model_layers(model)) + 1))
    kw = {"grads": False, "acts": True, "batch_size": batch_size}
    with_p = run_pass(model, tokenizer, encode_all(tokenizer, prompted, max_len), Condition("ip"), layers, **kw)
    without = run_pass(model, tokenizer, encode_all(tokenizer, conversations, max_len), Condition("plain"), layers, **kw)
    total, count = None, 0
    for a, b in zip(with_p, without):
        n = common_suffix(a.input_ids, b.input_ids)
        d = torch.stack([a.acts[l][len(a.input_ids) - n :] - b.acts[l][len(b.input_ids) - n :] for l in layers]).sum(1)
        total = d if total is None else total + d
        count += n
    return total / max(count, 1)


def random_like(table, seed: int):
    """Gaussian vectors with the same norm as each row of `table` (zero rows stay zero)."""
    import torch

    g = torch.randn(table.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float32)
    norms = table.float().norm(dim=-1, keepdim=True)
    return g / g.norm(dim=-1, keepdim=True) * norms


def save_vector(path: str | Path, table, metadata: dict[str, Any]) -> Path:
    """One-tensor safetensors file ("vector", float32) with string metadata, written atomically."""
    from safetensors.torch import save

    from ..tables import atomic_write_bytes

    meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()}
    atomic_write_bytes(path, save({"vector": table.float().contiguous()}, metadata=meta))
    return Path(path)


def load_table(path: str | Path, key: str = ""):
    """A [L+1, d] vector table from a .safetensors (its only tensor, or `key`) or .pt file."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"mech.vectors: {path} not found")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        tensors = load_file(str(path))
        if key or len(tensors) != 1:
            if key not in tensors:
                raise ConfigError(f"{path}: name the tensor as {path}#KEY (has {', '.join(tensors)})")
            return tensors[key].float()
        return next(iter(tensors.values())).float()
    t = torch.load(str(path), map_location="cpu", weights_only=True)
    if not isinstance(t, torch.Tensor):
        raise ConfigError(f"{path}: holds a {type(t).__name__}, not a tensor")
    return t.float()
