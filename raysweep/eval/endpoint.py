"""Many chat completions on any OpenAI-compatible endpoint (OpenAI, a vLLM server, ...).

`chat_many(cfg, requests)` sends the requests concurrently (at most `cfg.concurrency` in
flight) with a progress bar, and returns one `Reply` per request, in order. The `openai`
client retries timeouts, connection errors, 429 and 5xx with exponential backoff and
jitter (honouring Retry-After); a request that still fails becomes a `Reply` with an
`error`, never an exception, so one bad row never costs the batch. Successful replies
are kept in an on-disk cache (`judge_cache.py`): a request made once is never sent again.

The API key is read from the environment variable named by `cfg.api_key_env` when the
client is built; it is never stored in a config, a reply, an error text or a log line.
"""

from __future__ import annotations

import asyncio
import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError
from .judge_cache import JudgeCache, cache_key

Request = dict[str, Any]  # a chat-completions body without `model`: {"messages": [...], "temperature": 0, ...}


@dataclass(frozen=True)
class EndpointConfig:
    model: str = "gpt-4.1-mini"  # model name sent with each request
    base_url: str = ""  # "" = OpenAI's API; e.g. http://127.0.0.1:8000/v1 for a vLLM server
    api_key_env: str = "OPENAI_API_KEY"  # environment variable that holds the key
    concurrency: int = 32  # requests in flight at once
    retries: int = 4  # retries of a timed-out, rate-limited (429) or failed (5xx) request
    timeout: float = 60.0  # seconds per attempt
    cache: str = ""  # SQLite cache file ("" = no cache)


@dataclass(frozen=True)
class Reply:
    content: str | None  # the first choice's message text
    top_logprobs: list[Any] | None  # first generated token's alternatives as sent ({"token", "logprob"}), if any
    raw: str  # the response body as received ("" when no response came)
    error: str = ""  # "" when OK, else why the call failed
    cached: bool = False  # served from the disk cache


def require_key(cfg: EndpointConfig) -> str:
    """The API key from the environment (a placeholder for a local server without one)."""
    key = os.environ.get(cfg.api_key_env, "")
    if key:
        return key
    if cfg.base_url:  # a local server (e.g. vLLM) usually takes no key, but the client needs one
        return "no-key"
    raise ConfigError(f"api_key_env (eval.judge_api_key_env for the judge): environment variable "
                      f"{cfg.api_key_env} is not set")


def _scrub(text: str, api_key: str) -> str:
    """Error texts come from servers and libraries: make sure the key is not among them."""
    return text.replace(api_key, "<redacted>") if len(api_key) >= 4 else text


def parse_reply(body: str, cached: bool = False) -> Reply:
    """A Reply from a response body; a body without a first choice is an error."""
    try:
        data = json.loads(body)
        message = data["choices"][0]["message"]
        content = message.get("content")
    except (ValueError, KeyError, IndexError, TypeError, AttributeError):
        return Reply(None, None, body, f"malformed response: {body[:200]!r}", cached)
    try:
        top = data["choices"][0]["logprobs"]["content"][0]["top_logprobs"]
    except (KeyError, IndexError, TypeError):
        top = None  # no logprobs asked for, or none sent: the caller decides whether that is an error
    return Reply(content if isinstance(content, str) else None, top, body, "", cached)


def _failure(exc: Exception, cfg: EndpointConfig, api_key: str) -> str:
    import openai

    if isinstance(exc, openai.APITimeoutError):
        text = f"timed out ({cfg.timeout:g} s per attempt, {cfg.retries} retries)"
    elif isinstance(exc, openai.APIConnectionError):
        text = f"connection failed ({cfg.retries} retries): {exc}"
    elif isinstance(exc, openai.APIStatusError):
        retried = exc.status_code in (408, 409, 429) or exc.status_code >= 500  # what the client retries
        body = " ".join(exc.response.text.split())[:200]
        text = f"HTTP {exc.status_code}" + (f" after {cfg.retries} retries" if retried else "") + f": {body}"
    else:
        text = f"{type(exc).__name__}: {exc}"
    return _scrub(text, api_key)


async def _send(client, cfg: EndpointConfig, request: Request, api_key: str) -> Reply:
    import openai

    try:
        response = await client.chat.completions.with_raw_response.create(model=cfg.model, **request)
        body = response.text
    except openai.OpenAIError as exc:
        return Reply(None, None, "", _failure(exc, cfg, api_key))
    return parse_reply(body)


async def _chat_all(cfg: EndpointConfig, requests: list[Request], desc: str) -> list[Reply]:
    from openai import AsyncOpenAI
    from tqdm import tqdm

    keys = [cache_key(cfg.model, r) for r in requests]
    first: dict[str, Request] = {}
    for k, r in zip(keys, requests):
        first.setdefault(k, r)  # identical requests are sent once
    unique = list(first)
    cache = JudgeCache(cfg.cache) if cfg.cache else None
    done: dict[str, Reply] = {}
    try:
        if cache is not None:
            for k in unique:
                hit = cache.get(k)
                if hit is not None:
                    done[k] = parse_reply(hit, cached=True)
        todo = [k for k in unique if k not in done]
        if todo:
            api_key = require_key(cfg)
            gate = asyncio.Semaphore(cfg.concurrency)
            client = AsyncOpenAI(api_key=api_key, base_url=cfg.base_url or None, max_retries=cfg.retries,
                                 timeout=cfg.timeout)
            with tqdm(total=len(unique), initial=len(done), desc=desc, unit="call") as bar:
                async def one(k: str) -> None:
                    async with gate:
                        reply = await _send(client, cfg, first[k], api_key)
                    if cache is not None and not reply.error:
                        cache.put(k, cfg.model, first[k], reply.raw)
                    done[k] = reply
                    bar.update()

                async with client:
                    await asyncio.gather(*(one(k) for k in todo))
    finally:
        if cache is not None:
            cache.close()
    return [done[k] for k in keys]


def chat_many(cfg: EndpointConfig, requests: list[Request], desc: str = "chat") -> list[Reply]:
    """One Reply per request, in order (see the module docstring)."""
    if cfg.concurrency < 1:
        raise ConfigError(f"endpoint concurrency must be >= 1, got {cfg.concurrency}")
    for i, r in enumerate(requests):
        if "model" in r or "messages" not in r:
            raise ValueError(f"request {i}: a request holds `messages` and sampling parameters, not `model`")
    if not requests:
        return []
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(_chat_all(cfg, requests, desc))
    # Called from inside an event loop (a notebook, an async actor): run ours in a thread.
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, _chat_all(cfg, requests, desc)).result()
