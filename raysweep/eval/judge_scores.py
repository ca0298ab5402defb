"""The 0-100 protocol's arithmetic, shared by the judges (judges.py, judge_digits.py): which
tokens are scores, the score from a reply's top logprobs, and the score from the exact
log-probability of every string '0'..'100' (the local judge, and whole numbers read digit by
digit). NaN with a reason when the probability on the scores is under the minimum mass."""

from __future__ import annotations

import json
import math

import numpy as np

Score = tuple[float, str]  # (score or NaN, reason: "" when scored)
SCORE_STRINGS = [str(n) for n in range(101)]


def is_score_token(token: str) -> bool:
    """A token that is an integer in [0, 100] written in ASCII digits.

    Seed 001: "every token that parses as an integer in [0, 100]"; the issue: exactly ASCII
    integers. So '7', '42', '100' and '05' (= 5) count; ' 5' (whitespace), '+5', '٣' and
    '３' (non-ASCII digits, which Python's int() would accept) do not.
    """
    return isinstance(token, str) and token.isascii() and token.isdigit() and int(token) <= 100


def _mass_reason(mass: float, min_mass: float) -> str:
    return f"probability mass on scores {mass:.3g} < eval.judge_min_mass={min_mass:g}"


def logprob_score(top: object, min_mass: float) -> Score:
    """Probability-weighted mean of the score tokens among the top logprobs, normalised by their mass."""
    if top is None:
        return math.nan, "reply has no logprobs"
    if not isinstance(top, list) or not top:
        return math.nan, f"malformed logprobs: expected a non-empty list, got {str(top)[:100]!r}"
    mass = weighted = 0.0
    for entry in top:
        token = entry.get("token") if isinstance(entry, dict) else None
        lp = entry.get("logprob") if isinstance(entry, dict) else None
        if not isinstance(token, str) or isinstance(lp, bool) or not isinstance(lp, (int, float)) \
                or math.isnan(lp) or lp > 1e-6:
            return math.nan, f"malformed logprobs: entry {str(entry)[:100]!r}"
        if is_score_token(token):
            p = math.exp(lp)
            mass += p
            weighted += p * int(token)
    if mass <= 0.0 or mass < min_mass:
        return math.nan, _mass_reason(mass, min_mass)
    return weighted / mass, ""


def grade_candidates(logprobs: np.ndarray, min_mass: float) -> tuple[float, str, str]:
    """(score, reason, raw) from the logprobs of the strings '0'..'100': softmax over them, weighted mean."""
    from scipy.special import logsumexp, softmax

    mass = float(np.exp(logsumexp(logprobs)))
    p = softmax(logprobs)
    top = {SCORE_STRINGS[i]: round(float(p[i]), 6) for i in np.argsort(-p)[:5]}
    raw = json.dumps({"mass": mass, "top": top})
    if mass <= 0.0 or mass < min_mass:
        return math.nan, _mass_reason(mass, min_mass), raw
    return float(p @ np.arange(len(p))), "", raw
