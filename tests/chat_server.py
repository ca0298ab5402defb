"""A real HTTP server on 127.0.0.1 (ephemeral port, in a thread) that speaks the OpenAI
chat-completions API with scripted top logprobs and scripted faults.

A script is chosen per request by a marker string found in the request's messages (the
tests put the marker in the answer being judged); requests without a marker get
`default`. Every request is recorded (marker, body, headers) so tests can count them.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class Script:
    top: list[tuple[str, float]] = field(default_factory=list)  # (token, logprob) of the first token
    status: int = 200  # HTTP status of the faulty replies
    faults: int = 0  # this many requests get `status` (or `delay`) before a good reply; -1 = all
    delay: float = 0.0  # seconds to stall a faulty request before answering
    body: str | None = None  # raw body of the good reply instead of a chat completion
    logprobs: Any = "top"  # "top": built from `top`; anything else is sent as the choice's logprobs


def completion(model: str, top: list[tuple[str, float]], logprobs: Any = "top") -> dict[str, Any]:
    entries = [{"token": t, "logprob": lp, "bytes": list(t.encode())} for t, lp in top]
    content = top[0][0] if top else ""
    if logprobs == "top":
        logprobs = {"content": [{"token": content, "logprob": top[0][1] if top else 0.0, "top_logprobs": entries}]}
    return {
        "id": "chatcmpl-test", "object": "chat.completion", "created": int(time.time()), "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                     "logprobs": logprobs, "finish_reason": "length"}],
        "usage": {"prompt_tokens": 10, "completion_tokens": 1, "total_tokens": 11},
    }


class ChatServer:
    def __init__(self, default: Script | None = None):
        self.scripts: dict[str, Script] = {}
        self.default = default or Script(top=[("50", 0.0)])
        self.received: list[dict[str, Any]] = []  # {"marker", "body", "headers" (lower-case names)} per request
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:  # keep test output quiet
                pass

            def do_POST(self) -> None:
                raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if self.path.rstrip("/") != "/v1/chat/completions":
                    return self._send(404, {"error": {"message": f"no route {self.path}"}})
                body = json.loads(raw)
                _, script, nth = server._record(body, {k.lower(): v for k, v in self.headers.items()})
                if script.faults == -1 or nth < script.faults:
                    if script.delay:
                        time.sleep(script.delay)
                    return self._send(script.status, {"error": {"message": f"scripted {script.status}"}})
                if script.body is not None:
                    return self._send(200, script.body)
                return self._send(200, completion(body["model"], script.top, script.logprobs))

            def _send(self, status: int, payload: Any) -> None:
                data = payload if isinstance(payload, str) else json.dumps(payload)
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data.encode())))
                    self.end_headers()
                    self.wfile.write(data.encode())
                except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout test)
                    pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.base_url = f"http://127.0.0.1:{self.httpd.server_port}/v1"
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def _record(self, body: dict[str, Any], headers: dict[str, str]) -> tuple[str, Script, int]:
        text = json.dumps(body.get("messages", []))
        marker = next((m for m in self.scripts if m in text), "")
        with self._lock:
            nth = sum(r["marker"] == marker for r in self.received)
            self.received.append({"marker": marker, "body": body, "headers": headers})
        return marker, self.scripts.get(marker, self.default), nth

    def count(self, marker: str) -> int:
        with self._lock:
            return sum(r["marker"] == marker for r in self.received)

    def __enter__(self) -> "ChatServer":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
