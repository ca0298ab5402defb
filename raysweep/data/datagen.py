"""Data generation, `python -m raysweep.data rephrase|generate ...`.

rephrase: N distinct rephrasings of a prompt, from any OpenAI-compatible endpoint or the
local model, written in the pool format the `ip` defense reads (one {"rephrasing": ...}
per line). The output file is the cache: a rerun reads it and asks only for what is
missing, and each round rewrites it atomically, so a kill loses at most the round in flight.
Rephrasings are deduplicated on normalised text (case, Unicode form, spacing, surrounding
quotes and end punctuation); the prompt itself is not a rephrasing.

generate: trait training data = the model's answers to instructions under a datagen
system prompt (seed 003: "Give a french and playful answer to the following:"),
optionally kept only when a judge scores them at or above a threshold; written as chat
JSONL that data.read_chat reads (user = the instruction alone, assistant = the answer).

Every request carries its own seed, so the requests of a round differ from each other and
from earlier rounds (an endpoint's cache and dedup never hand back an old answer), and
the same run asks the same questions.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import sys
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..errors import ConfigError
from . import Messages, read_pool, read_questions
from .conversations import question_messages, with_prefix
from ..tables import write_text

# The seed's datagen system prompt for the Playful/French training data (seed 003, prompts.json).
DATAGEN_PROMPT = "Give a french and playful answer to the following:"
TEMPLATES = {
    "diverse": (
        "Rephrase the following instruction in a new way, with different words and structure, "
        "keeping its meaning. Reply with the rephrased instruction only.\n\nInstruction: {prompt}"
    ),
    # Semantically tight rephrasings, as the seed's close-mix pools (Exp 18).
    "close": (
        "Rephrase the following instruction with minimal changes: keep its structure and most of "
        "its words, and swap only one or two words for close synonyms. Reply with the rephrased "
        "instruction only.\n\nInstruction: {prompt}"
    ),
}

# conversations, seed, progress label -> one reply per conversation (None: the call failed)
Complete = Callable[[list[Messages], int, str], list[str | None]]


class DataGenError(RuntimeError):
    """Generation could not deliver what was asked (too few distinct answers, a dead endpoint)."""


@dataclass(frozen=True)
class Sampling:
    temperature: float = 1.0  # the seed samples fully stochastically (temperature 1, top_p 1)
    top_p: float = 1.0
    max_tokens: int = 64


def _seed(*parts: object) -> int:
    return int.from_bytes(hashlib.sha256(":".join(map(str, parts)).encode()).digest()[:4], "little")


# ---------------------------------------------------------------------------------------------
# Backends


def local_backend(model_name: str, dtype: str, sampling: Sampling, batch_size: int) -> Complete:
    """Sample from a local model with the transformers backend (loaded on first use)."""

    @functools.cache
    def loaded():
        from ..train.models import load_model

        return load_model(model_name, dtype)

    def complete(conversations: list[Messages], seed: int, desc: str) -> list[str | None]:
        from tqdm import tqdm

        from ..eval.generation import generate

        model, tok = loaded()
        out: list[str | None] = []
        with tqdm(total=len(conversations), desc=desc, unit="answer") as bar:
            for start in range(0, len(conversations), batch_size):
                chunk = conversations[start : start + batch_size]
                out += generate(
                    model, tok, chunk, max_new_tokens=sampling.max_tokens, temperature=sampling.temperature,
                    top_p=sampling.top_p, seed=_seed(seed, start), batch_size=batch_size,
                )
                bar.update(len(chunk))
        return out

    return complete


def endpoint_backend(endpoint, sampling: Sampling) -> Complete:
    """Sample from an OpenAI-compatible endpoint (raysweep.eval.endpoint.EndpointConfig)."""
    from ..eval.endpoint import chat_many

    def complete(conversations: list[Messages], seed: int, desc: str) -> list[str | None]:
        requests = [
            {"messages": c, "temperature": sampling.temperature, "top_p": sampling.top_p,
             "max_tokens": sampling.max_tokens, "seed": _seed(seed, i)}
            for i, c in enumerate(conversations)
        ]
        replies = chat_many(endpoint, requests, desc=desc)
        failed = [r.error for r in replies if r.error]
        if failed and len(failed) == len(replies):
            raise DataGenError(f"every request to {endpoint.base_url or 'the OpenAI API'} failed: {failed[0]}")
        if failed:
            print(f"{len(failed)} of {len(replies)} requests failed (first: {failed[0]})", file=sys.stderr)
        return [None if r.error else r.content for r in replies]

    return complete


# ---------------------------------------------------------------------------------------------
# rephrase


def normalise(text: str) -> str:
    """The form two rephrasings are compared in: the same words count as the same rephrasing."""
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split()).strip(" \"'`.!;:")


def clean(reply: str | None) -> str:
    """The rephrasing in a reply: its first non-blank line without surrounding quotes."""
    lines = [line.strip() for line in (reply or "").splitlines() if line.strip()]
    return lines[0].strip("\"'`“”").strip() if lines else ""


def write_pool(path: Path, rephrasings: list[str]) -> None:
    write_text(path, "".join(json.dumps({"rephrasing": r}, ensure_ascii=False) + "\n" for r in rephrasings))


def rephrase(
    prompt: str, n: int, out: Path, complete: Complete, *, template: str = TEMPLATES["diverse"], seed: int = 0,
    max_rounds: int = 20,
) -> int:
    """Grow the pool at `out` to n distinct rephrasings of `prompt`; return the requests made."""
    out = Path(out)
    have = read_pool(out) if out.is_file() else []
    seen = {normalise(t) for t in have} | {normalise(prompt)}
    asked = [{"role": "user", "content": template.format(prompt=prompt)}]
    requests = 0
    for round_ in range(max_rounds):
        need = n - len(have)
        if need <= 0:
            break
        # The seed depends on the pool's size: a rerun after a kill asks new questions.
        replies = complete([asked] * need, _seed("rephrase", seed, len(have), round_), f"rephrase ({len(have)}/{n})")
        requests += need
        before = len(have)
        for reply in replies:
            text = clean(reply)
            if text and normalise(text) not in seen and len(have) < n:
                seen.add(normalise(text))
                have.append(text)
        if len(have) > before:
            write_pool(out, have)
    if len(have) < n:
        raise DataGenError(
            f"{out}: {len(have)} distinct rephrasings after {max_rounds} rounds ({n} asked); "
            "rerun to continue, or raise --max-rounds"
        )
    return requests


# ---------------------------------------------------------------------------------------------
# generate


def generate_data(
    questions: list[str], out: Path, complete: Complete, *, datagen_prompt: str = DATAGEN_PROMPT,
    placement: str = "system", seed: int = 0, judge=None, threshold: float = 50.0,
) -> dict[str, int]:
    """Answer each instruction under the datagen prompt, optionally judge-filter, write chat JSONL.

    Returns counts: asked, answered (non-empty replies), kept (written).
    """
    conversations = [with_prefix(question_messages(q), datagen_prompt, placement) for q in questions]
    replies = complete(conversations, _seed("generate", seed), "generate")
    rows = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a.strip()}]}
            for q, a in zip(questions, replies) if a and a.strip()]
    answered = len(rows)
    if judge is not None and rows:
        graded = judge([r["messages"][0]["content"] for r in rows], [r["messages"][1]["content"] for r in rows])
        # NaN (unscored) fails the comparison: only answers the judge scored can be kept.
        rows = [{**r, "judge": judge.name, "score": s} for r, (s, _) in zip(rows, graded) if s >= threshold]
    if not rows:
        raise DataGenError(f"{out}: no answer to keep ({len(questions)} asked, {answered} answered)")
    write_text(out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return {"asked": len(questions), "answered": answered, "kept": len(rows)}


# ---------------------------------------------------------------------------------------------
# Command line


def _bounded(kind: type, low: float | None = None, high: float | None = None, low_open: bool = False):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a {kind.__name__}, got {text!r}") from None
        if low is not None and (value <= low if low_open else value < low):
            raise argparse.ArgumentTypeError(f"must be {'>' if low_open else '>='} {low:g}, got {text}")
        if high is not None and value > high:
            raise argparse.ArgumentTypeError(f"must be <= {high:g}, got {text}")
        return value

    return parse


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m raysweep.data", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)

    def backend_args(q: argparse.ArgumentParser, max_tokens: int) -> None:
        q.add_argument("--backend", choices=("local", "endpoint"), default="local",
                       help="local model (transformers) or an OpenAI-compatible endpoint")
        q.add_argument("--model", help="local: model name or path (default smollm2-135m-instruct); "
                                       "endpoint: model name (default gpt-4.1-mini)")
        q.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"), help="local weights")
        q.add_argument("--batch-size", type=_bounded(int, 1), default=16, help="local: prompts per batch")
        q.add_argument("--base-url", default="", help='endpoint URL, e.g. http://127.0.0.1:8000/v1 ("" = OpenAI)')
        q.add_argument("--api-key-env", default="OPENAI_API_KEY", help="environment variable holding the API key")
        q.add_argument("--concurrency", type=_bounded(int, 1), default=32, help="endpoint requests in flight")
        q.add_argument("--retries", type=_bounded(int, 0), default=4, help="retries of a failed request")
        q.add_argument("--timeout", type=_bounded(float, 0, low_open=True), default=60.0, help="seconds per attempt")
        q.add_argument("--cache", default="", help="endpoint reply cache (SQLite file; default none)")
        q.add_argument("--temperature", type=_bounded(float, 0), default=1.0)
        q.add_argument("--top-p", type=_bounded(float, 0, 1, low_open=True), default=1.0)
        q.add_argument("--max-tokens", type=_bounded(int, 1), default=max_tokens, help="reply length cap")
        q.add_argument("--seed", type=int, default=0)

    r = sub.add_parser("rephrase", help="N distinct rephrasings of a prompt, as a rephrasing pool")
    r.add_argument("--prompt", required=True, help="the prompt to rephrase")
    r.add_argument("--n", type=_bounded(int, 1), required=True, help="rephrasings wanted in the pool")
    r.add_argument("--out", required=True, type=Path, help="pool file (JSONL); an existing one is continued")
    r.add_argument("--style", choices=sorted(TEMPLATES), default="diverse", help="built-in instruction")
    r.add_argument("--template", help="custom instruction containing {prompt} (overrides --style)")
    r.add_argument("--max-rounds", type=_bounded(int, 1), default=20, help="rounds of requests before giving up")
    backend_args(r, 64)

    g = sub.add_parser("generate", help="trait training data: answers under a datagen system prompt")
    g.add_argument("--questions", required=True, type=Path,
                   help='instructions: {"question": ...} per line, or chat rows (first user turn)')
    g.add_argument("--limit", type=_bounded(int, 0), default=0, help="first N instructions (0 = all)")
    g.add_argument("--out", required=True, type=Path, help="chat JSONL to write")
    g.add_argument("--datagen-prompt", default=DATAGEN_PROMPT, help="the prompt the answers are generated under")
    g.add_argument("--placement", choices=("system", "user_prefix"), default="system",
                   help="datagen prompt as the system prompt or before the instruction")
    g.add_argument("--judge", default="", help="keep only answers this registered judge scores >= --threshold")
    g.add_argument("--trait", default="french", help="trait the judge scores")
    g.add_argument("--threshold", type=_bounded(float, 0, 100), default=50.0, help="minimum judge score (0-100)")
    g.add_argument("--judge-model", default="gpt-4.1-mini", help="logprob judge: endpoint model name")
    g.add_argument("--judge-base-url", default="", help='logprob judge: endpoint URL ("" = OpenAI)')
    g.add_argument("--judge-local-model", default="smollm2-135m-instruct", help="local judge: model name or path")
    g.add_argument("--judge-min-mass", type=_bounded(float, 0, 1), default=0.25,
                   help="logprob/local judges: unscored below this probability on the scores")
    backend_args(g, 256)
    return p


def _backend(args: argparse.Namespace) -> Complete:
    sampling = Sampling(args.temperature, args.top_p, args.max_tokens)
    if args.backend == "local":
        return local_backend(args.model or "smollm2-135m-instruct", args.dtype, sampling, args.batch_size)
    from ..eval.endpoint import EndpointConfig

    endpoint = EndpointConfig(
        model=args.model or "gpt-4.1-mini", base_url=args.base_url, api_key_env=args.api_key_env,
        concurrency=args.concurrency, retries=args.retries, timeout=args.timeout, cache=args.cache,
    )
    return endpoint_backend(endpoint, sampling)


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "rephrase":
            template = args.template or TEMPLATES[args.style]
            if "{prompt}" not in template:
                parser.error("argument --template: must contain {prompt}")
            if not args.prompt.strip():
                parser.error("argument --prompt: empty prompt")
            if args.out.is_file():
                read_pool(args.out)  # a malformed existing pool fails before any request
            requests = rephrase(args.prompt, args.n, args.out, _backend(args), template=template, seed=args.seed,
                                max_rounds=args.max_rounds)
            print(f"{args.out}: {len(read_pool(args.out))} rephrasings ({requests} new requests)")
        else:
            if not args.questions.is_file():
                parser.error(f"argument --questions: file not found: {args.questions}")
            questions = read_questions(args.questions, args.limit)
            judge = None
            if args.judge:
                from ..config.schema import EvalConfig
                from ..eval.judges import make_judge

                settings = EvalConfig(judge=args.judge, trait=args.trait, judge_model=args.judge_model,
                                      judge_base_url=args.judge_base_url, judge_local_model=args.judge_local_model,
                                      judge_min_mass=args.judge_min_mass, judge_api_key_env=args.api_key_env)
                try:
                    judge = make_judge(args.judge, args.trait, settings)
                except ConfigError as exc:
                    parser.error(f"argument --judge: {exc}")
            counts = generate_data(questions, args.out, _backend(args), datagen_prompt=args.datagen_prompt,
                                   placement=args.placement, seed=args.seed, judge=judge, threshold=args.threshold)
            print(f"{args.out}: {counts['kept']} examples ({counts['answered']} answered of {counts['asked']})")
    except ConfigError as exc:  # bad input file or setting: named in the message
        parser.error(str(exc))
    except DataGenError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0
