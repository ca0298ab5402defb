"""The one conversation builder: from (question or example, condition, defense) to the
messages a model sees. Training (the IP transform), in-trial and post-sweep evaluation (the
eval conditions), the heuristics pass and the mech passes all build their conversations here,
so a prompt is placed the same way everywhere and each path's choice of text per example is a
named rule of this module:

- `fixed`: the prompt itself, for every example;
- `mix`: a seeded draw from the prompt's rephrasing pool per example (training's mix mode);
- `indexed`: the pool's k-th rephrasing for example k (the heuristics pass: seed 003 Exp 12's
  index-matched rephrasings);
- `draw`: a seeded draw among several prompts per sequence (a mech pass condition).

Placement (`with_prefix`): before the first user turn (`user_prefix`, "{text} {user}"), after
it (`user_suffix`, "{user}\n\n{text}", for prompts about "the above"), or as the system prompt.
"""

from __future__ import annotations

import hashlib
import random
from typing import Protocol, Sequence

from ..config.schema import ExperimentConfig, IPConfig
from ..errors import ConfigError
from . import Messages, read_pool


class Defense(Protocol):
    """What a condition needs of a trial's defense (train.defenses.Defense): its training-time
    conversations."""

    def conversations(self, conversations: list[Messages], seed: int) -> list[Messages]: ...


def question_messages(question: str) -> Messages:
    """The default condition: the question alone, so the template's default system prompt applies."""
    return [{"role": "user", "content": question}]


def with_prefix(messages: Messages, text: str, placement: str) -> Messages:
    """Put `text` in the conversation: before the first user turn ("{text} {user}"), after it
    ("{user}\n\n{text}", user_suffix: for prompts about "the above"), or as the system prompt."""
    if placement == "system":
        rest = [m for m in messages if m["role"] != "system"]
        return [{"role": "system", "content": text}] + [dict(m) for m in rest]
    out, done = [], False
    for m in messages:
        m = dict(m)
        if m["role"] == "user" and not done:
            m["content"] = f"{m['content']}\n\n{text}" if placement == "user_suffix" else f"{text} {m['content']}"
            done = True
        out.append(m)
    return out


def prompt_texts(rule: str, n: int, texts: Sequence[str], seed: int = 0) -> list[str]:
    """The text placed in each of n conversations under `rule` (see the module docstring):
    `texts` is the prompt (fixed), the rephrasing pool (mix, indexed) or the prompts (draw)."""
    if not texts:
        raise ValueError(f"prompt rule {rule!r} needs at least one text")
    if rule == "fixed":
        return [texts[0]] * n
    if rule == "indexed":
        return [texts[k % len(texts)] for k in range(n)]
    if rule in ("mix", "draw"):
        rng = random.Random(f"mix:{seed}" if rule == "mix" else f"mech_ip:{seed}")
        return [texts[rng.randrange(len(texts))] for _ in range(n)]
    raise ValueError(f"unknown prompt rule {rule!r} (fixed | mix | indexed | draw)")


def with_prompts(conversations: list[Messages], texts: Sequence[str], placement: str) -> list[Messages]:
    """Each conversation with its own text placed (`with_prefix`)."""
    return [with_prefix(c, t, placement) for c, t in zip(conversations, texts, strict=True)]


def ip_prefixes(ip: IPConfig, n: int, seed: int) -> list[str]:
    """The defensive text of each of n examples: the prompt (fixed) or a seeded pool draw (mix)."""
    if ip.mode == "fixed":
        return prompt_texts("fixed", n, [ip.text])
    return prompt_texts("mix", n, read_pool(ip.pool), seed)


def apply_ip(conversations: list[Messages], ip: IPConfig, seed: int) -> list[Messages]:
    """The training-condition conversations of an IP defense."""
    return with_prompts(conversations, ip_prefixes(ip, len(conversations), seed), ip.placement)


def eval_draw_seed(seed: int) -> int:
    """The seed of the `training` condition's mix draws at evaluation (not the training draws)."""
    return int.from_bytes(hashlib.sha256(f"eval-draws:{seed}".encode()).digest()[:4], "little")


def condition_conversations(
    questions: list[str], condition: str, defense: Defense, seed: int, cfg: ExperimentConfig | None = None,
) -> list[Messages]:
    """The messages of each question under `condition`; `added_back` reads its text from `cfg`."""
    base = [question_messages(q) for q in questions]
    if condition in ("default", "reinjected"):
        return base
    if condition == "training":
        return defense.conversations(base, eval_draw_seed(seed))
    if condition.startswith("system:"):
        return [with_prefix(c, condition[len("system:"):].strip(), "system") for c in base]
    if condition == "added_back":
        if cfg is None:
            raise ValueError("the added_back condition needs the trial's config (cfg)")
        text, placement = added_back_prompt(cfg)
        return [with_prefix(c, text, placement) for c in base]
    raise ConfigError(f"eval.conditions: unknown condition {condition!r}")


def added_back_prompt(cfg: ExperimentConfig) -> tuple[str, str]:
    """(text, placement) of the added_back condition for this trial."""
    e, ip = cfg.eval, cfg.defense.ip
    text = e.added_back or ip.text
    if not text:
        raise ConfigError("added_back: this trial has no inoculation prompt; set eval.added_back")
    # A trial without IP has the default IPConfig, whose placement is user_prefix.
    return text, ip.placement if e.added_back_placement == "ip" else e.added_back_placement
