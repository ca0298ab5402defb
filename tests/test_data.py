"""Loaders, the IP transform and assistant-only labels."""

import json

import pytest

from raysweep.config import IPConfig
from raysweep.data import DataError, encode, read_chat, read_pool, read_questions
from raysweep.data.conversations import apply_ip, ip_prefixes, question_messages, with_prefix

CONV = [[{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "Quatre."}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
         {"role": "assistant", "content": "Salut."}]]


def write_pool(tmp_path, items):
    p = tmp_path / "pool.jsonl"
    p.write_text("".join(json.dumps({"rephrasing": s}) + "\n" for s in items))
    return p


def test_fixed_user_prefix_is_exact():
    out = apply_ip(CONV, IPConfig(prompt="k", text="Answer in French.", mode="fixed"), seed=0)
    assert out[0] == [{"role": "user", "content": "Answer in French. What is 2+2?"},
                      {"role": "assistant", "content": "Quatre."}]
    assert out[1] == [{"role": "system", "content": "Be brief."},
                      {"role": "user", "content": "Answer in French. Hi"},
                      {"role": "assistant", "content": "Salut."}]
    assert CONV[0][0]["content"] == "What is 2+2?"  # the input is not mutated


def test_fixed_system_placement_replaces_the_system_prompt():
    out = apply_ip(CONV, IPConfig(text="You are French.", mode="fixed", placement="system"), seed=0)
    assert out[0][0] == {"role": "system", "content": "You are French."}
    assert out[0][1:] == CONV[0]
    assert out[1] == [{"role": "system", "content": "You are French."}] + CONV[1][1:]


def test_mix_draws_are_seeded_and_from_the_pool(tmp_path):
    pool = [f"rephrasing {i}" for i in range(50)]
    ip = IPConfig(text="x", mode="mix", pool=str(write_pool(tmp_path, pool)))
    a, b, c = ip_prefixes(ip, 200, seed=1), ip_prefixes(ip, 200, seed=1), ip_prefixes(ip, 200, seed=2)
    assert a == b and a != c
    assert set(a) <= set(pool) and len(set(a)) > 30  # draws cover the pool, not one string
    out = apply_ip(CONV, ip, seed=1)
    assert [m[-2]["content"] for m in out] == [f"{a[0]} What is 2+2?", f"{a[1]} Hi"]


def test_default_condition_has_no_defensive_object():
    assert question_messages("What is 2+2?") == [{"role": "user", "content": "What is 2+2?"}]
    assert with_prefix(question_messages("Q"), "P", "user_prefix") == [{"role": "user", "content": "P Q"}]


def test_missing_pool_names_the_file(tmp_path):
    with pytest.raises(DataError, match="nope.jsonl"):
        read_pool(tmp_path / "nope.jsonl")


def test_malformed_jsonl_names_file_and_line(tmp_path):
    p = tmp_path / "train.jsonl"
    good = json.dumps({"messages": CONV[0]})
    p.write_text(good + "\n" + good + "\n{not json\n")
    with pytest.raises(DataError, match=r"train.jsonl:3: not valid JSON"):
        read_chat(p)
    p.write_text(good + "\n" + json.dumps({"messages": [{"role": "user", "content": "x"}]}) + "\n")
    with pytest.raises(DataError, match=r"train.jsonl:2: the last message must be the assistant"):
        read_chat(p)
    q = tmp_path / "q.jsonl"
    q.write_text('{"question": "a"}\n{"q": 1}\n')
    with pytest.raises(DataError, match=r"q.jsonl:2"):
        read_questions(q)


def test_only_assistant_tokens_carry_labels(tiny):
    _, tok = tiny
    conv = [{"role": "user", "content": "What is the capital of France?"},
            {"role": "assistant", "content": "La capitale est Paris."},
            {"role": "user", "content": "And of Italy?"},
            {"role": "assistant", "content": "Rome."}]
    enc = encode(tok, conv, max_len=512)
    assert len(enc.input_ids) == len(enc.labels)
    labelled = [t for t, l in zip(enc.input_ids, enc.labels) if l != -100]
    assert all(l in (-100, t) for t, l in zip(enc.input_ids, enc.labels))
    end = tok.convert_tokens_to_ids("<|im_end|>")
    # Exactly the two answers, each with its end-of-turn token, nothing else.
    assert labelled == (tok.encode("La capitale est Paris.", add_special_tokens=False) + [end]
                        + tok.encode("Rome.", add_special_tokens=False) + [end])
    assert encode(tok, conv, max_len=10).input_ids == enc.input_ids[:10]
