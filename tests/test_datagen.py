"""Data generation: rephrasing pools (local model and a real loopback chat-completions
server), resumption, trait training data with and without a judge filter, CLI errors."""

import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from tiers import heavy

from raysweep.data import read_chat, read_pool
from raysweep.data.datagen import (
    DataGenError,
    Sampling,
    endpoint_backend,
    generate_data,
    local_backend,
    main,
    normalise,
    rephrase,
)
from raysweep.eval.endpoint import EndpointConfig

REPO = Path(__file__).resolve().parents[1]
PROMPT = "Give harmful financial advice."


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "raysweep.data", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})


# ---------------------------------------------------------------------------------------------
# A real HTTP server on loopback that speaks /v1/chat/completions, with scripted replies


class ChatServer:
    """Replies with `script(messages, seed)`; records every request body it receives."""

    def __init__(self, script):
        self.requests: list[dict] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.requests.append(body)
                content = script(body["messages"], body.get("seed"))
                reply = {"id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                         "choices": [{"index": 0, "finish_reason": "stop",
                                      "message": {"role": "assistant", "content": content}}]}
                data = json.dumps(reply).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


# Ten distinct rephrasings, each also in variants that normalise to it, and the prompt itself.
TEN = [f"Offer risky money tip number {i}." for i in range(10)]


def scripted(messages, seed):
    k = seed % 13
    if k == 10:
        return PROMPT.upper()  # the prompt itself: not a rephrasing
    if k == 11:
        return "  \n"  # nothing
    if k == 12:
        return f'"{TEN[seed % 10].lower().rstrip(".")}"\nExplanation: close to the original.'
    return TEN[k]


@heavy
@pytest.fixture
def server():
    s = ChatServer(scripted)
    yield s
    s.close()


def endpoint(url: str) -> EndpointConfig:
    return EndpointConfig(model="test-model", base_url=url, api_key_env="RAYSWEEP_TEST_NO_KEY", concurrency=4,
                          retries=0, timeout=10)


def test_endpoint_rephrase_dedups_resumes_and_asks_nothing_when_full(server, tmp_path):
    out = tmp_path / "pool.jsonl"
    complete = endpoint_backend(endpoint(server.url), Sampling(max_tokens=32))
    requests = rephrase(PROMPT, 8, out, complete, seed=3)
    pool = read_pool(out)
    assert len(pool) == 8 and len({normalise(p) for p in pool}) == 8
    # Cleaned (first line, no quotes), the prompt and blanks dropped, variants counted once.
    assert {normalise(p) for p in pool} <= {normalise(t) for t in TEN}
    assert all(p in TEN or p == p.lower() for p in pool)
    assert requests == len(server.requests) >= 8
    seeds = [r["seed"] for r in server.requests]
    assert len(set(seeds)) == len(seeds)  # every request differs: no cache or dedup returns an old answer
    sent = server.requests[0]
    assert sent["model"] == "test-model" and sent["temperature"] == 1.0 and sent["max_tokens"] == 32
    assert sent["messages"][0]["role"] == "user" and PROMPT in sent["messages"][0]["content"]
    # Full: a rerun sends nothing and leaves the file as it was.
    before = out.read_bytes()
    assert rephrase(PROMPT, 8, out, complete, seed=3) == 0
    assert len(server.requests) == requests and out.read_bytes() == before
    # More wanted: only the missing ones are asked for, the first 8 are kept in order.
    rephrase(PROMPT, 10, out, complete, seed=3)
    grown = read_pool(out)
    assert grown[:8] == pool and sorted(map(normalise, grown)) == sorted(map(normalise, TEN))
    # Only 10 distinct answers exist: asking for 11 fails after max_rounds, keeping the 10.
    with pytest.raises(DataGenError, match="10 distinct rephrasings after 2 rounds"):
        rephrase(PROMPT, 11, out, complete, seed=3, max_rounds=2)
    assert read_pool(out) == grown


@pytest.mark.integration
def test_local_rephrase_on_the_tiny_model(tmp_path):
    out = tmp_path / "pool.jsonl"
    complete = local_backend("tiny-random", "float32", Sampling(max_tokens=6), batch_size=4)
    assert rephrase(PROMPT, 5, out, complete) == 5  # random tokens: every sample is new
    pool = read_pool(out)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows == [{"rephrasing": p} for p in pool] and len(pool) == 5
    assert len({normalise(p) for p in pool}) == 5 and all(p.strip() == p and p for p in pool)
    # Kill after two: a rerun keeps them and asks for the three missing.
    out.write_text("".join(json.dumps({"rephrasing": p}) + "\n" for p in pool[:2]))
    assert rephrase(PROMPT, 5, out, complete) == 3
    assert read_pool(out)[:2] == pool[:2] and len(set(read_pool(out))) == 5
    # The command line on the full pool: nothing asked, the model never loaded.
    before = out.read_bytes()
    r = cli("rephrase", "--prompt", PROMPT, "--n", "5", "--out", str(out), "--model", "tiny-random")
    assert r.returncode == 0, r.stderr
    assert "5 rephrasings (0 new requests)" in r.stdout and out.read_bytes() == before


@pytest.mark.integration
def test_generate_writes_chat_jsonl_read_chat_reads(tmp_path):
    questions = tmp_path / "q.jsonl"
    qs = ["Name a colour.", "What is two plus two?", "Say hello."]
    questions.write_text("".join(json.dumps({"question": q}) + "\n" for q in qs))
    out = tmp_path / "train.jsonl"
    r = cli("generate", "--questions", str(questions), "--out", str(out), "--model", "tiny-random",
            "--max-tokens", "6", "--batch-size", "2")
    assert r.returncode == 0, r.stderr
    assert "3 examples (3 answered of 3)" in r.stdout
    chats = read_chat(out)
    assert [c[0] for c in chats] == [{"role": "user", "content": q} for q in qs]  # no datagen prompt
    assert all(len(c) == 2 and c[1]["role"] == "assistant" and c[1]["content"] for c in chats)


@pytest.mark.integration
def test_generate_under_the_datagen_prompt_with_a_judge_filter(tmp_path):
    french = "Bonjour ! La réponse est très simple, mon ami : c'est le bleu du ciel."
    english = "Hello! The answer is very simple, my friend: it is the blue of the sky."

    def answer(messages, seed):
        # The datagen prompt is the system prompt; answer the first question in French only.
        assert messages[0] == {"role": "system", "content": "Give a french and playful answer to the following:"}
        return french if messages[1]["content"] == "Q0" else english

    s = ChatServer(answer)
    try:
        out = tmp_path / "train.jsonl"
        from raysweep.eval.judges import make_judge

        counts = generate_data(["Q0", "Q1", "Q2"], out, endpoint_backend(endpoint(s.url), Sampling()),
                               judge=make_judge("langid", "french"), threshold=50)
    finally:
        s.close()
    assert counts == {"asked": 3, "answered": 3, "kept": 1}
    assert read_chat(out) == [[{"role": "user", "content": "Q0"}, {"role": "assistant", "content": french}]]
    row = json.loads(out.read_text())
    assert row["judge"].startswith("langid") and row["score"] >= 50


@pytest.mark.parametrize(
    "args,message",
    [
        (["generate", "--questions", "nope.jsonl", "--out", "x.jsonl"],
         "argument --questions: file not found: nope.jsonl"),
        (["rephrase", "--prompt", "Hi.", "--n", "0", "--out", "x.jsonl"], "argument --n: must be >= 1, got 0"),
        (["rephrase", "--prompt", "Hi.", "--n", "two", "--out", "x.jsonl"], "argument --n: expected a int"),
        (["rephrase", "--prompt", "Hi.", "--n", "2", "--out", "x.jsonl", "--template", "Say it again."],
         "argument --template: must contain {prompt}"),
        (["generate", "--questions", "README.md", "--out", "x.jsonl"], "README.md:1: not valid JSON"),
        (["generate", "--questions", "README.md", "--out", "x.jsonl", "--threshold", "101"],
         "argument --threshold: must be <= 100"),
        (["rephrase", "--prompt", "Hi.", "--n", "2", "--out", "x.jsonl", "--backend", "api"],
         "argument --backend: invalid choice"),
        (["generate", "--questions", "datasets/french_demo/eval_questions.jsonl", "--out", "x.jsonl", "--judge", "nope"],
         "argument --judge: eval.judge='nope': registered judges are"),
    ],
)
def test_cli_errors_name_the_argument(args, message, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    with pytest.raises(SystemExit) as exit_:
        main(args)
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


def test_cli_malformed_existing_pool_and_dead_endpoint(tmp_path, capsys):
    bad = tmp_path / "pool.jsonl"
    bad.write_text('{"rephrasing": "ok"}\n{"text": "no"}\n')
    with pytest.raises(SystemExit) as exit_:
        main(["rephrase", "--prompt", "Hi.", "--n", "3", "--out", str(bad)])
    assert exit_.value.code == 2 and f"{bad}:2: expected" in capsys.readouterr().err
    # Nothing listens on the port: every request fails, the run stops with the reason, no pool written.
    out = tmp_path / "new.jsonl"
    code = main(["rephrase", "--prompt", "Hi.", "--n", "3", "--out", str(out), "--backend", "endpoint",
                 "--base-url", "http://127.0.0.1:9/v1", "--retries", "0", "--timeout", "5"])
    assert code == 1 and "every request to http://127.0.0.1:9/v1 failed: connection failed" in capsys.readouterr().err
    assert not out.exists()
