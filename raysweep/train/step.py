"""The LoRA fine-tuning pieces: schedule, collation, optimiser, the step.

The step (`train_step`) fits on one screen; logging, checkpointing and evaluation live
in `trial.py`, which drives the loop.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from ..config.schema import TrainConfig
from ..data import Encoded


def steps_per_epoch(cfg: TrainConfig, n_examples: int) -> int:
    """Optimizer steps in one pass: a last partial effective batch is still a step.

    Seed 001 (E.3) counts this way: 4,681 samples at 4 x 8 = 1,171 micro-batches and 147
    steps per epoch, 441 for 3 epochs (E.4). Seed 003 counts 10k / 32 = 312 steps (dropping
    the last 16 examples; the ceil would give 313): its experiment files pin that count
    (train.max_steps: 312, 181 for the EM setting), so each file carries its seed's count.
    """
    return max(1, math.ceil(n_examples / (cfg.batch_size * cfg.grad_accum)))


def total_steps(cfg: TrainConfig, n_examples: int) -> int:
    if cfg.max_steps:
        return cfg.max_steps
    return cfg.epochs * steps_per_epoch(cfg, n_examples)


def checkpoint_steps(cfg: TrainConfig, total: int) -> list[int]:
    """Steps whose adapter is saved: always 0 (the base model) and the final step."""
    if cfg.checkpoints == "pow2":  # the seed's 2^N schedule
        steps = {0, total} | {2**k for k in range(int(math.log2(total)) + 1) if 2**k <= total}
    elif cfg.checkpoints == "explicit":
        steps = {0, total} | {s for s in cfg.checkpoint_steps if 0 <= s <= total}
    else:
        steps = {0, total}
    return sorted(steps)


def example_order(n: int, steps: int, micro_per_step: int, batch_size: int, seed: int) -> list[list[list[int]]]:
    """Example indices of every step's micro-batches: step s (1-based) trains on `[s - 1]`.

    Epoch after epoch, each a seeded shuffle of all `n` examples cut into effective batches
    of `micro_per_step` x `batch_size`; an epoch's last, partial effective batch is a shorter
    step (its last micro-batch shorter too: seed 001's 1,171 micro-batches of 4,681 at 4),
    never filled with the next epoch's examples. A step never spans two epochs. A pure
    function of its arguments, and a step's batches do not depend on `steps`, so a resumed
    trial sees the same batches.
    """
    per_step = micro_per_step * batch_size
    out: list[list[list[int]]] = []
    epoch = 0
    while len(out) < steps and n > 0:
        perm = list(range(n))
        random.Random(f"order:{seed}:{epoch}").shuffle(perm)
        for i in range(0, n, per_step):
            chunk = perm[i : i + per_step]
            out.append([chunk[j : j + batch_size] for j in range(0, len(chunk), batch_size)])
        epoch += 1
    return out[:steps]


@dataclass(frozen=True)
class Collator:
    pad_id: int

    def __call__(self, items: list[Encoded]):
        """Right-padded tensors; padding carries no label and no attention."""
        import torch

        width = max(len(e.input_ids) for e in items)
        ids = torch.full((len(items), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(items), width), -100, dtype=torch.long)
        mask = torch.zeros((len(items), width), dtype=torch.long)
        for i, e in enumerate(items):
            n = len(e.input_ids)
            ids[i, :n] = torch.tensor(e.input_ids)
            labels[i, :n] = torch.tensor(e.labels)
            mask[i, :n] = 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def add_lora(model, cfg: TrainConfig, seed: int):
    import torch
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)  # LoRA A matrices are initialised randomly
    lora = LoraConfig(
        r=cfg.lora.r,
        lora_alpha=cfg.lora.alpha,
        lora_dropout=cfg.lora.dropout,
        use_rslora=cfg.lora.rslora,
        target_modules=list(cfg.lora.target_modules),
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, lora)


def make_optimizer(model, cfg: TrainConfig, total: int):
    import torch
    from transformers import get_scheduler

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    name = {"linear": "linear", "cosine": "cosine", "constant": "constant_with_warmup"}[cfg.schedule]
    sched = get_scheduler(name, opt, num_warmup_steps=cfg.warmup_steps, num_training_steps=total)
    return opt, sched


def micro_loss(model, batch):
    """Summed next-token cross-entropy over labelled tokens, and their count."""
    import torch.nn.functional as F

    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    labels = batch["labels"][:, 1:]
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels.flatten(), ignore_index=-100, reduction="sum")
    return loss, int((labels != -100).sum())


def train_step(model, opt, sched, micro_batches, max_grad_norm: float) -> dict[str, float]:
    """One optimiser step over the effective batch; loss is the token-weighted mean."""
    import torch

    n_tokens = sum(int((b["labels"][:, 1:] != -100).sum()) for b in micro_batches)
    total = 0.0
    for batch in micro_batches:
        loss, _ = micro_loss(model, batch)
        (loss / max(n_tokens, 1)).backward()
        total += loss.item()
    params = [p for p in model.parameters() if p.requires_grad]
    norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm if max_grad_norm > 0 else float("inf"))
    lr = sched.get_last_lr()[0]
    opt.step()
    sched.step()
    opt.zero_grad(set_to_none=True)
    return {"loss": total / max(n_tokens, 1), "lr": lr, "grad_norm": float(norm), "n_tokens": n_tokens}
