"""Forward/backward passes that record the residual stream: activations and activation gradients.

A *condition* says how the model sees the data: an optional inoculation prompt (a data
transform, as in training) and optional steering (forward hooks, as in training). The
gradient is dL/dh at the output of decoder layer l for L = the summed next-token
cross-entropy over assistant tokens (001 Eq. 3); with steering on, h is the steered output,
whose gradient equals that of the unsteered one (the vector is added).

Passes stream one `SeqRecord` per sequence so the analyses reduce as they go and memory
stays bounded by one batch.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from ..data import Encoded, Messages, encode
from ..data.conversations import prompt_texts, with_prompts
from ..eval.scoring import decoder_and_head, label_logprobs

SPANS = ("response", "all")


@dataclass(frozen=True)
class Condition:
    """How the model sees a sequence in a pass: IP text and steering (vector, layer, coef) triples."""

    name: str
    prompts: tuple[str, ...] = ()  # inoculation texts, one drawn per sequence (seeded); () = none
    placement: str = "user_prefix"  # user_prefix | system, as defense.ip.placement
    seed: int = 0  # seed of the per-sequence prompt draw
    steer: tuple = ()  # ((vector [hidden], layer, coef), ...)
    ip: str = ""  # key of the prompt, for the tables
    steer_label: str = ""  # what is steered, for the tables
    coef: float = 0.0  # steering coefficient, for the tables (0 = no steering)

    def conversations(self, conversations: list[Messages]) -> list[Messages]:
        """The conversations as the model sees them: with a prompt drawn per sequence, as IP's mix mode does."""
        if not self.prompts:
            return conversations
        return with_prompts(conversations, prompt_texts("draw", len(conversations), self.prompts, self.seed),
                            self.placement)


@dataclass
class SeqRecord:
    """One sequence of a pass: token ids, label mask, loss and per-layer residual tensors [T, d]."""

    index: int
    input_ids: list[int]
    response: Any  # bool [T]: assistant (labelled) positions
    loss_sum: float  # summed next-token CE over labelled tokens
    n_tokens: int  # labelled tokens predicted
    condition: int = 0  # index of its condition in a batched multi-coefficient pass
    grads: dict[int, Any] = field(default_factory=dict)  # layer -> dL/dh [T, d] (float32, CPU)
    acts: dict[int, Any] = field(default_factory=dict)  # layer -> h [T, d] (float32, CPU); 0 = embeddings

    def positions(self, span: str):
        """Bool [T] of the positions averaged over: assistant tokens, or every token."""
        import torch

        if span == "response":
            return self.response
        if span == "all":
            return torch.ones_like(self.response)
        raise ValueError(f"span must be one of {', '.join(SPANS)}, got {span!r}")


def encode_all(tokenizer, conversations: list[Messages], max_len: int) -> list[Encoded]:
    return [encode(tokenizer, c, max_len) for c in conversations]


@contextlib.contextmanager
def _capture(model, layers: list[int], keep: dict[int, Any]) -> Iterator[None]:
    """Keep the output of each layer in `layers` (0 = the embedding output) in `keep`."""
    import torch

    from ..train.models import model_layers

    blocks = model_layers(model)

    def hook_for(layer: int):
        def hook(module, args, output):
            h = output[0] if isinstance(output, tuple) else output
            if layer == 0 and not h.requires_grad and torch.is_grad_enabled():
                # Frozen embeddings: make the residual stream differentiable from its start.
                h = h.detach().requires_grad_()
                keep[layer] = h
                return h
            keep[layer] = h
            return None

        return hook

    handles = [model.get_input_embeddings().register_forward_hook(hook_for(0))]
    try:
        handles += [blocks[l - 1].register_forward_hook(hook_for(l)) for l in layers if l != 0]
        yield
    finally:
        for h in handles:
            h.remove()


def _batches(n: int, batch_size: int) -> list[list[int]]:
    return [list(range(i, min(i + batch_size, n))) for i in range(0, n, batch_size)]


def same_but_coefs(conditions: list[Condition]) -> bool:
    """Whether the conditions differ at most in their steering coefficients (one batched pass can run them)."""
    import torch

    a = conditions[0]
    for c in conditions[1:]:
        if (c.prompts, c.placement, c.seed, len(c.steer)) != (a.prompts, a.placement, a.seed, len(a.steer)):
            return False
        if any(lc != la or not torch.equal(vc, va) for (vc, lc, _), (va, la, _) in zip(c.steer, a.steer)):
            return False
    return True


def run_pass(
    model, tokenizer, encoded: list[Encoded], condition: Condition | list[Condition], layers: list[int], *,
    grads: bool = True, acts: bool = False, batch_size: int = 4,
) -> Iterator[SeqRecord]:
    """Stream one record per encoded sequence under `condition`'s steering (its prompt is in `encoded`).

    `grads`: dL/dh at each layer (one backward per batch, parameter gradients untouched);
    `acts`: the residual stream h at each layer.

    A list of K conditions that differ only in their coefficients (`same_but_coefs`, e.g. an
    intensity sweep) runs as one pass: each batch holds every sequence K times, each copy
    steered with its condition's coefficients (a per-row coefficient), so the records come
    K per sequence, condition-major within the batch (`record.condition` = its index).
    `batch_size` counts rows, copies included. Rows do not interact, so this equals K passes.
    """
    import torch

    from ..train.defenses import steer
    from ..train.step import Collator

    conds = condition if isinstance(condition, list) else [condition]
    if not same_but_coefs(conds):
        raise ValueError("run_pass: a list of conditions must differ only in their steering coefficients")
    k = len(conds)
    collate = Collator(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0)
    device = next(model.parameters()).device
    decoder, head, post = decoder_and_head(model)
    for seqs in _batches(len(encoded), max(1, batch_size // k)):
        idx = [i for _ in conds for i in seqs]  # copy c of the batch = rows c*len(seqs) ... (c+1)*len(seqs)-1
        which = [c for c in range(k) for _ in seqs]
        batch = collate([encoded[i] for i in idx])
        if k == 1:
            triples = list(conds[0].steer)
        else:  # each triple's coefficient per row: [rows, 1, 1]
            triples = [(v, layer, torch.tensor([float(conds[c].steer[j][2]) for c in which]).view(-1, 1, 1))
                       for j, (v, layer, _) in enumerate(conds[0].steer)]
        keep: dict[int, Any] = {}
        with steer(model, triples), _capture(model, layers, keep), torch.enable_grad() if grads else torch.no_grad():
            hidden = decoder(input_ids=batch["input_ids"].to(device),
                             attention_mask=batch["attention_mask"].to(device)).last_hidden_state
            labels = batch["labels"][:, 1:].to(device)
            lp = label_logprobs(head, post, hidden[:, :-1], labels)  # the kernel's sequence layout: [B, T - 1]
            loss = -lp.sum(1)  # [B]: next-token CE summed per sequence; rows do not interact (right padding, causal)
            g = torch.autograd.grad(loss.sum(), [keep[l] for l in layers]) if grads else [None] * len(layers)
        for row, i in enumerate(idx):
            n = len(encoded[i].input_ids)
            rec = SeqRecord(
                index=i, condition=which[row], input_ids=list(encoded[i].input_ids),
                response=torch.tensor(encoded[i].labels) != -100,
                loss_sum=float(loss[row].detach()), n_tokens=int((labels[row] != -100).sum()),
            )
            for l, gl in zip(layers, g):
                if grads:
                    rec.grads[l] = gl[row, :n].detach().float().cpu()
                if acts:
                    rec.acts[l] = keep[l][row, :n].detach().float().cpu()
            yield rec
        del keep, hidden, lp, g


def mean_over(t, positions, drop_zero: bool = False):
    """Mean over the rows of t [T, d] selected by `positions`; with drop_zero, rows that are all zero are left out."""
    sel = t[positions]
    if drop_zero:
        sel = sel[sel.abs().sum(-1) > 0]
    return sel.mean(0) if len(sel) else t.new_zeros(t.shape[-1])


def token_cosines(t, v, positions):
    """Cosine of each selected row of t [T, d] with v [d]; rows with a zero gradient carry no direction and are dropped."""
    import torch.nn.functional as F

    sel = t[positions]
    sel = sel[sel.abs().sum(-1) > 0]
    return F.cosine_similarity(sel, v[None, :].to(sel.dtype), dim=-1)


def common_suffix(a: list[int], b: list[int]) -> int:
    """Length of the longest common token suffix: the positions aligned after a prompt."""
    n = 0
    while n < min(len(a), len(b)) and a[-1 - n] == b[-1 - n]:
        n += 1
    return n
