"""The 0-100 protocol on an endpoint whose judge model splits numbers into digits.

The seed's protocol reads the score from the first generated token's top-20 logprobs. That
works where "0".."100" are single tokens (GPT-4.1-mini, Llama 3). A judge whose tokenizer
writes numbers digit by digit (Qwen2.5, Mistral, Gemma, SmolLM) puts its first-token mass
on "0".."9", so "85" would read as 8. When every score token among the top logprobs is a single digit
and the server's tokenizer splits numbers into digits, the score is instead read from the
whole number, as the local judge does:

    p(n) = p(first digit) x p(next digit | ...) x ... x p(end of turn | all digits of n)

for every n in 0..100 (the candidates '0'..'100', each followed by the end of turn), then
the same softmax-weighted mean and minimum mass as the local judge (`judges.grade_candidates`).

The probabilities come from the endpoint by continuing the assistant message (vLLM's
`continue_final_message`) after each prefix of a candidate, asking for the exact logprobs of
the ten digit tokens and the end-of-turn token (`logprob_token_ids`, returned as token ids).
The prefixes are visited level by level ("" -> "8" -> "85" -> ...), all answers' requests of a
level sent together, and a prefix whose probability is below `EXPAND_MIN` is not continued:
its candidates count as probability 0 and the mass left unread is reported in `raw`.
The token ids come from the server's `/tokenize` route, once per judge model and rubric.

A server that cannot do this (no `/tokenize`, no `continue_final_message`) gives NaN with that
reason, never the first digit read as the score. OpenAI's own API (no `eval.judge_base_url`)
serves models that write 0-999 as one token: a lone digit there is the score.
"""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np

DIGITS = "0123456789"
SCORES = [str(n) for n in range(101)]
EXPAND_MIN = 1e-7  # a prefix less probable than this is not continued (its score strings count as 0)

Messages = list[dict[str, str]]


def digit_split(top: object) -> bool:
    """True when the top logprobs hold score tokens and every one is a single digit."""
    from .judge_scores import is_score_token

    if not isinstance(top, list):
        return False
    tokens = [e.get("token") for e in top if isinstance(e, dict)]
    scores = [t for t in tokens if is_score_token(t)]
    return bool(scores) and all(len(t) == 1 for t in scores)


def _server_root(base_url: str) -> str:
    """vLLM serves /tokenize next to /v1, at the server's root."""
    root = base_url.rstrip("/")
    return root[: -len("/v1")] if root.endswith("/v1") else root


def turn_token_ids(endpoint, messages: Messages) -> tuple[list[int], int] | str | None:
    """(ids of '0'..'9', id of the end-of-turn token) from the server's tokenizer; None when
    the judge's tokenizer keeps numbers whole (the first token is the score); else why not.

    The assistant turn "0123456789" is tokenised open (continued) and closed: a digit-splitting
    tokenizer ends the open one in ten one-digit tokens, and the first token the closed one
    adds is the end of turn. OpenAI's models (no base_url) write 0-999 as one token.
    """
    import httpx

    from .endpoint import require_key

    if not endpoint.base_url:
        return None
    turn = messages + [{"role": "assistant", "content": DIGITS}]
    headers = {"Authorization": f"Bearer {require_key(endpoint)}"}
    out = []
    try:
        for body in ({"continue_final_message": True, "add_generation_prompt": False},
                     {"continue_final_message": False, "add_generation_prompt": False}):
            r = httpx.post(f"{_server_root(endpoint.base_url)}/tokenize", headers=headers, timeout=endpoint.timeout,
                           json={"model": endpoint.model, "messages": turn, "return_token_strs": True, **body})
            r.raise_for_status()
            out.append(r.json())
    except (httpx.HTTPError, ValueError) as exc:
        status = f"HTTP {exc.response.status_code}" if isinstance(exc, httpx.HTTPStatusError) else type(exc).__name__
        return f"the endpoint cannot continue a message: its /tokenize route failed ({status})"
    open_ids, closed_ids = out[0].get("tokens") or [], out[1].get("tokens") or []
    if (out[0].get("token_strs") or [])[-10:] != list(DIGITS):
        return None  # numbers are not split into digits: the seed's first-token protocol applies
    if closed_ids[: len(open_ids)] != open_ids or len(closed_ids) == len(open_ids):
        return "the judge's chat template does not end the turn after the digits; cannot read whole numbers"
    return open_ids[-10:], closed_ids[len(open_ids)]


def _continue_request(messages: Messages, prefix: str, ids: list[int]) -> dict[str, Any]:
    """One token after `prefix` in the assistant turn, with the logprobs of exactly `ids`.
    vLLM's own parameters travel in the openai client's `extra_body`."""
    vllm: dict[str, Any] = {"logprob_token_ids": ids, "return_tokens_as_token_ids": True}
    if prefix:
        messages = messages + [{"role": "assistant", "content": prefix}]
        vllm.update(continue_final_message=True, add_generation_prompt=False)
    return {"messages": messages, "temperature": 0, "max_tokens": 1, "logprobs": True, "extra_body": vllm}


def _token_logprobs(raw: str, ids: list[int]) -> dict[int, float] | str:
    """token id -> logprob of `ids` in a reply to `_continue_request`, or why not."""
    try:
        top = json.loads(raw)["choices"][0]["logprobs"]["content"][0]["top_logprobs"]
        got = {int(e["token"].removeprefix("token_id:")): float(e["logprob"]) for e in top}
    except (ValueError, KeyError, IndexError, TypeError, AttributeError):
        return f"the endpoint cannot continue a message: reply without token-id logprobs: {raw[:200]!r}"
    missing = [i for i in ids if i not in got]
    if missing:
        return f"the endpoint cannot continue a message: reply lacks the logprobs of token ids {missing}"
    return got


def _children(prefix: str) -> list[str]:
    """Prefixes one digit longer that lead to a score in 0..100 ('0' and '100' end there)."""
    if prefix == "0" or len(prefix) == 3:
        return []
    return [c for c in (prefix + d for d in DIGITS) if c in SCORES or any(s.startswith(c) for s in SCORES[10:])]


def read_numbers(endpoint, conversations: list[Messages], min_mass: float,
                 desc: str) -> list[tuple[float, str, str]] | None:
    """(score, reason, raw) per conversation, from the digit-by-digit probabilities of '0'..'100';
    None when the judge's tokenizer keeps numbers whole (the seed's protocol reads them)."""
    from .endpoint import chat_many
    from .judge_scores import grade_candidates

    if not conversations:
        return []
    found = turn_token_ids(endpoint, conversations[0])  # the template's digits and end of turn
    if found is None:
        return None
    if isinstance(found, str):
        return [(math.nan, found, "")] * len(conversations)
    digit_ids, end = found  # the same for every conversation: one template
    n = range(len(conversations))
    out: list[tuple[float, str, str] | None] = [None] * len(conversations)
    # prefix probability (log) per conversation; a prefix's end-of-turn logprob completes a candidate
    prefix_lp: dict[int, dict[str, float]] = {i: {"": 0.0} for i in n}
    score_lp: dict[int, dict[str, float]] = {i: {} for i in n}
    unread: dict[int, float] = {i: 0.0 for i in n}
    level = {i: [""] for i in n}
    while any(level.values()):
        todo = [(i, p) for i, ps in level.items() for p in ps]
        replies = chat_many(endpoint, [_continue_request(conversations[i], p, [*digit_ids, end]) for i, p in todo],
                            desc=f"{desc} (digits)")
        level = {i: [] for i in n}
        for (i, prefix), reply in zip(todo, replies):
            if out[i] is not None:
                continue
            got = reply.error or _token_logprobs(reply.raw, [*digit_ids, end])
            if isinstance(got, str):
                out[i] = (math.nan, got if not reply.error else f"judge call failed: {reply.error}", "")
                continue
            here = prefix_lp[i][prefix]
            if prefix in SCORES:
                score_lp[i][prefix] = here + got[end]
            for child in _children(prefix):
                lp = here + got[digit_ids[int(child[-1])]]
                if math.exp(lp) >= EXPAND_MIN:
                    prefix_lp[i][child] = lp
                    level[i].append(child)
                else:
                    unread[i] += math.exp(lp)
    for i in n:
        if out[i] is not None:
            continue
        logprobs = np.array([score_lp[i].get(s, -np.inf) for s in SCORES])
        score, reason, raw = grade_candidates(logprobs, min_mass)
        detail = {**json.loads(raw), "read": "digits", "unread_prefix_mass": unread[i],
                  "calls": len(prefix_lp[i])}
        out[i] = (score, reason, json.dumps(detail))
    return out  # type: ignore[return-value]
