"""Data: chat JSONL and question loaders, rephrasing pools, the IP transform, tokenisation.

Loaders report the file and line of a malformed row. The IP transform is a pure function
of (conversations, IPConfig, seed): the same inputs give the same messages.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ConfigError

Messages = list[dict[str, str]]
ROLES = ("system", "user", "assistant")


class DataError(ConfigError):
    """A data file is missing or malformed; the message names the file and line."""


def read_jsonl(path: str | Path) -> list[tuple[int, Any]]:
    """(line number, object) for every non-blank line; a bad line names file and line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    rows = []
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                rows.append((lineno, json.loads(line)))
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{lineno}: not valid JSON ({exc.msg} at column {exc.colno})") from None
    return rows


def read_chat(path: str | Path, limit: int = 0) -> list[Messages]:
    """Chat JSONL: one {"messages": [{"role", "content"}, ...]} per line, ending with an assistant turn."""
    out = []
    for lineno, row in read_jsonl(path):
        where = f"{path}:{lineno}"
        msgs = row.get("messages") if isinstance(row, dict) else None
        if not isinstance(msgs, list) or not msgs:
            raise DataError(f'{where}: expected an object with a non-empty "messages" list')
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
                raise DataError(f'{where}: messages[{i}] must be {{"role": system|user|assistant, "content": str}}')
        if msgs[-1]["role"] != "assistant":
            raise DataError(f"{where}: the last message must be the assistant's answer")
        if not any(m["role"] == "user" for m in msgs):
            raise DataError(f"{where}: no user message")
        out.append([{"role": m["role"], "content": m["content"]} for m in msgs])
    if not out:
        raise DataError(f"{path}: no examples")
    return out[:limit] if limit else out


def read_questions(path: str | Path, limit: int = 0) -> list[str]:
    """Question JSONL: {"question": str} per line (a chat row's first user turn also works)."""
    out = []
    for lineno, row in read_jsonl(path):
        if isinstance(row, dict) and isinstance(row.get("question"), str):
            out.append(row["question"])
        elif isinstance(row, dict) and isinstance(row.get("messages"), list):
            users = [m.get("content") for m in row["messages"] if isinstance(m, dict) and m.get("role") == "user"]
            if not users or not isinstance(users[0], str):
                raise DataError(f"{path}:{lineno}: no user message")
            out.append(users[0])
        else:
            raise DataError(f'{path}:{lineno}: expected {{"question": str}}')
    if not out:
        raise DataError(f"{path}: no questions")
    return out[:limit] if limit else out


def read_pool(path: str | Path) -> list[str]:
    """Rephrasing pool: {"rephrasing": str} per line (the seed repository's format)."""
    if not Path(path).is_file():
        raise DataError(
            f"rephrasing pool not found: {path} (mix mode reads <data.rephrasings_dir>/<prompt>.jsonl "
            "or defense.ip.pool)"
        )
    out = []
    for lineno, row in read_jsonl(path):
        if not isinstance(row, dict) or not isinstance(row.get("rephrasing"), str):
            raise DataError(f'{path}:{lineno}: expected {{"rephrasing": str}}')
        out.append(row["rephrasing"])
    if not out:
        raise DataError(f"{path}: empty rephrasing pool")
    return out


def shuffled(items: list[Any], seed: int, limit: int = 0) -> list[Any]:
    items = list(items)
    random.Random(seed).shuffle(items)
    return items[:limit] if limit else items


# ---------------------------------------------------------------------------------------------
# Tokenisation: only assistant tokens carry labels


@dataclass(frozen=True)
class Encoded:
    input_ids: list[int]
    labels: list[int]  # -100 outside assistant turns


def _render(tokenizer, messages: Messages, generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def assistant_spans(tokenizer, messages: Messages) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of each assistant answer.

    Rendering a prefix with the generation prompt gives where an answer starts; rendering
    through the answer gives where it ends. The span keeps the end-of-turn token (the model
    must learn to stop) and drops the whitespace the template puts after it.
    """
    text = _render(tokenizer, messages, False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start = len(_render(tokenizer, messages[:i], True))
        end = len(_render(tokenizer, messages[: i + 1], False).rstrip())
        if not text.startswith(_render(tokenizer, messages[: i + 1], False)[:end]):
            raise DataError("chat template is not prefix-stable; cannot locate assistant tokens")
        spans.append((start, end))
    return text, spans


def encode(tokenizer, messages: Messages, max_len: int) -> Encoded:
    """Token ids of the rendered conversation; labels = ids on assistant tokens, -100 elsewhere."""
    text, spans = assistant_spans(tokenizer, messages)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    labels = [
        tok if any(s <= a < e for s, e in spans) else -100 for tok, (a, _b) in zip(ids, offsets)
    ]
    return Encoded(ids[:max_len], labels[:max_len])
