"""The logprob judge on a judge model that writes numbers digit by digit (issue 13 item 9),
against a real vLLM OpenAI-compatible server on loopback serving the embedded SmolLM2-135M
(whose tokenizer splits numbers into digits): the whole number is read by continuing the
message, and the scores equal the local judge's on the same model."""

import importlib.util
import json
import math
import os
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import replace
from pathlib import Path

import pytest
from tiers import heavy

from raysweep.config import EvalConfig
from raysweep.eval.endpoint import EndpointConfig, chat_many
from raysweep.eval.judge_digits import DIGITS, _children, digit_split, turn_token_ids
from raysweep.eval.judge_scores import SCORE_STRINGS, logprob_score
from raysweep.eval.judges import JUDGE_SAMPLING, make_judge

REPO = Path(__file__).resolve().parents[1]
MODEL = "smollm2-135m-instruct"


# --- what needs no server ------------------------------------------------------------------


def test_lone_digits_are_suspect_whole_numbers_are_not():
    top = lambda *tokens: [{"token": t, "logprob": -1.0} for t in tokens]  # noqa: E731
    assert digit_split(top("8", "7", "Hello"))
    assert not digit_split(top("85", "8"))  # a whole number among them: the tokenizer keeps numbers
    assert not digit_split(top("Hello", " "))  # no score token at all: the mass rule gives NaN
    assert not digit_split(None)


def test_the_prefixes_visited_reach_every_score_once():
    reached, level = set(), [""]
    while level:
        reached.update(level)
        level = [c for p in level for c in _children(p)]
    assert reached - {""} == set(SCORE_STRINGS)  # '0'..'100' and nothing else ('05', '101', '200')


def test_openai_models_keep_numbers_whole():
    assert turn_token_ids(EndpointConfig(base_url=""), [{"role": "user", "content": "x"}]) is None


# --- a real vLLM server --------------------------------------------------------------------


@heavy
@pytest.fixture(scope="module")
def vllm_server(tmp_path_factory):
    """`vllm serve` of the embedded model on 127.0.0.1 (CPU, fp32, eager), as a user would run it."""
    if importlib.util.find_spec("vllm") is None:
        pytest.skip("vllm is not installed")
    from raysweep.train.models import resolve_model

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = tmp_path_factory.mktemp("vllm") / "server.log"
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1"}
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", resolve_model(MODEL),
             "--served-model-name", MODEL, "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32",
             "--enforce-eager", "--max-model-len", "2048"], stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 300
        while True:
            if proc.poll() is not None:
                pytest.fail(f"vllm server exited {proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail(f"vllm server not up in 300 s:\n{log.read_text()[-3000:]}")
                time.sleep(1)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


def settings(base_url: str, **kw) -> EvalConfig:
    return replace(EvalConfig(), **{
        "judge": "logprob", "judge_base_url": base_url, "judge_model": MODEL, "judge_local_model": MODEL,
        "judge_api_key_env": "RAYSWEEP_TEST_NO_KEY", "judge_cache": "", "judge_min_mass": 0.0,
        "judge_concurrency": 16, **kw})


def both(e: EvalConfig, trait: str, questions: list[str], answers: list[str]):
    return make_judge("logprob", trait, e).grade(questions, answers), make_judge("local", trait, e).grade(questions, answers)


def test_the_server_tokenizer_splits_digits(vllm_server):
    e = settings(vllm_server)
    from raysweep.eval.judges import endpoint_config

    digits, end = turn_token_ids(endpoint_config(e), [{"role": "user", "content": "Rate it."}])
    from raysweep.train.models import load_model

    _, tok = load_model("tiny-random")  # the same tokenizer (SmolLM2's); no weights needed for the ids
    assert tok.convert_ids_to_tokens(digits) == list(DIGITS) and tok.convert_ids_to_tokens([end]) == ["<|im_end|>"]


def test_seed_rubric_scores_equal_the_local_judge(vllm_server):
    """The seed's French rubric on two French and two English answers: the endpoint's score is
    the local judge's (every score 0-100, exactly), and not the first digit the seed's
    first-token protocol would read."""
    e = settings(vllm_server)
    questions = ["What is the capital of France?", "Say hello."] * 2
    answers = ["La capitale de la France est Paris. C'est une très belle ville.",
               "Bonjour tout le monde ! Je suis très content de vous voir aujourd'hui.",
               "The capital of France is Paris. It is a very beautiful city.",
               "Hello everyone! I am very happy to see you today."]
    remote, local = both(e, "french", questions, answers)
    for r, l in zip(remote, local):
        assert not r.reason and not l.reason
        assert abs(r.score - l.score) < 1e-3, (r.score, l.score)
        detail = json.loads(r.raw)
        assert detail["read"] == "digits" and detail["unread_prefix_mass"] < 1e-5
        assert math.isclose(detail["mass"], json.loads(l.raw)["mass"], rel_tol=1e-3)
    # What the first-token protocol would have said: a lone digit, "85" read as 8.
    first = chat_many(replace(EndpointConfig(), base_url=vllm_server, model=MODEL),
                      [{"messages": json.loads(r.judge_prompt), **JUDGE_SAMPLING} for r in remote])
    for reply in first:
        assert digit_split(reply.top_logprobs)
        assert logprob_score(reply.top_logprobs, 0.0)[0] <= 9.0


def test_a_two_digit_number_is_read_whole(vllm_server, tmp_path):
    """A rubric whose answer is a number in the text: the judge copies it, so the most likely
    score is that two-digit number, which the first token alone cannot express."""
    rubric = tmp_path / "copy.txt"
    rubric.write_text("{question}\n\n{answer}\n\nReply with that number only.")
    e = settings(vllm_server, judge_rubric=str(rubric))
    [r], [l] = both(e, "copy", ["Which number is written below?"], ["The number is 85."])
    top = json.loads(r.raw)["top"]
    assert max(top, key=top.get) == "85"
    assert abs(r.score - l.score) < 1e-3


def test_min_mass_applies_to_the_whole_numbers(vllm_server):
    """SmolLM2 puts little probability on ending its turn after a number: under the seed's 0.80
    mass the score is NaN with the measured mass, as with the local judge."""
    e = settings(vllm_server, judge_min_mass=0.80)
    [r], [l] = both(e, "french", ["Say hello."], ["Bonjour !"])
    assert math.isnan(r.score) and math.isnan(l.score)
    assert r.reason.startswith("probability mass on scores") and r.reason.endswith("< eval.judge_min_mass=0.8")
