"""Tests for raysweep.eval.generation: batched == unbatched, seeded sampling, exact log-probs."""

import numpy as np
import pytest
import torch

from raysweep.eval.generation import generate, token_logprobs

QUESTIONS = [
    "Hi",
    "What is the capital of France?",
    "Name three colours.",
    "Explain in one sentence why the sky is blue, as if talking to a curious child who loves dinosaurs.",
    "What is 2 + 2?",
    "Write a haiku about autumn leaves falling slowly onto a quiet pond in the early morning light.",
]


def _convs(questions):
    return [[{"role": "user", "content": q}] for q in questions]


def test_batched_greedy_equals_one_by_one(smollm2):
    model, tok = smollm2
    convs = _convs(QUESTIONS)
    batched = generate(model, tok, convs, max_new_tokens=20, temperature=0.0, batch_size=4)
    single = [generate(model, tok, [c], max_new_tokens=20, temperature=0.0, batch_size=1)[0] for c in convs]
    assert batched == single
    assert all(r.strip() for r in batched)
    assert not any("<|im_end|>" in r or "<|im_start|>" in r for r in batched)


def test_sampling_is_seeded(smollm2):
    model, tok = smollm2
    convs = _convs(QUESTIONS[:4])
    kw = dict(max_new_tokens=12, temperature=1.0, top_p=0.95, batch_size=2)
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    a = generate(model, tok, convs, seed=1, **kw)
    assert torch.equal(torch.rand(3), expected_next)  # the caller's RNG stream is untouched
    assert generate(model, tok, convs, seed=1, **kw) == a
    assert generate(model, tok, convs, seed=2, **kw) != a


def test_greedy_ignores_checkpoint_sampling_defaults(tiny, monkeypatch):
    # Checkpoints such as Qwen ship sampling knobs in generation_config.json; they must not leak in.
    model, tok = tiny
    convs = _convs(QUESTIONS[:3])
    greedy = generate(model, tok, convs, max_new_tokens=8, temperature=0.0)
    sampled = generate(model, tok, convs, max_new_tokens=8, temperature=1.0, seed=3)
    for key, value in dict(do_sample=True, temperature=0.01, top_k=1, min_p=0.5, repetition_penalty=5.0).items():
        monkeypatch.setattr(model.generation_config, key, value)
    assert generate(model, tok, convs, max_new_tokens=8, temperature=0.0) == greedy
    assert generate(model, tok, convs, max_new_tokens=8, temperature=1.0, seed=3) == sampled


def test_empty_input(tiny):
    model, tok = tiny
    assert generate(model, tok, [], max_new_tokens=4) == []
    assert token_logprobs(model, [], []) == []


def _encoded(tok, questions, answers):
    """input_ids and labels with the prompt masked, as training data would be."""
    ids, labels = [], []
    for q, a in zip(questions, answers):
        conv = [{"role": "user", "content": q}]
        prompt = tok(tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=True), add_special_tokens=False)
        answer = tok(a + "<|im_end|>", add_special_tokens=False)
        ids.append(prompt["input_ids"] + answer["input_ids"])
        labels.append([-100] * len(prompt["input_ids"]) + answer["input_ids"])
    return ids, labels


def _reference_logprobs(model, ids, labels):
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([ids])).logits[0]
        lp = torch.log_softmax(logits.float(), dim=-1)
    return np.array([lp[t - 1, y].item() for t, y in enumerate(labels) if y != -100])


ANSWERS = ["Hello!", "Paris.", "Red, green and blue.", "Light scatters.", "4", "Leaves drift down."]


def test_token_logprobs_match_full_log_softmax(smollm2):
    model, tok = smollm2
    ids, labels = _encoded(tok, QUESTIONS, ANSWERS)
    batched = token_logprobs(model, ids, labels, batch_size=4)
    for seq, lab, got in zip(ids, labels, batched):
        [single] = token_logprobs(model, [seq], [lab], batch_size=1)
        want = _reference_logprobs(model, seq, lab)
        assert single.dtype == np.float64 and single.shape == want.shape == (sum(y != -100 for y in lab),)
        # fp32 noise: the lm_head runs on fewer rows than the reference, and padded batches take
        # a different SDPA kernel than unpadded ones; the drift is ~1e-6 relative after 30 layers.
        np.testing.assert_allclose(single, want, atol=1e-5, rtol=1e-5)
        np.testing.assert_allclose(got, single, atol=1e-5, rtol=1e-5)
        assert (got < 0).all()


def test_token_logprobs_scattered_labels_and_empty(tiny):
    model, tok = tiny
    seq = list(range(10, 30))
    lab = [-100, 11, -100, -100, 14, 15, -100] + [-100] * 12 + [29]
    [got] = token_logprobs(model, [seq], [lab])
    np.testing.assert_allclose(got, _reference_logprobs(model, seq, lab), atol=1e-5, rtol=0)
    [empty] = token_logprobs(model, [seq], [[-100] * len(seq)])
    assert empty.shape == (0,)


def test_token_logprobs_rejects_bad_labels(tiny):
    model, _ = tiny
    with pytest.raises(ValueError, match="first token"):
        token_logprobs(model, [[1, 2, 3]], [[1, 2, 3]])
    with pytest.raises(ValueError, match="labels"):
        token_logprobs(model, [[1, 2, 3]], [[-100, 2]])
    with pytest.raises(ValueError, match="batch_size"):
        token_logprobs(model, [[1, 2, 3]], [[-100, 2, 3]], batch_size=0)


def test_peft_wrapped_model_matches_base(tiny):
    from peft import LoraConfig, get_peft_model

    from raysweep.train.models import load_model

    base, tok = load_model("tiny-random")
    convs = _convs(QUESTIONS[:3])
    ids, labels = _encoded(tok, QUESTIONS[:3], ANSWERS[:3])
    want_text = generate(base, tok, convs, max_new_tokens=6, temperature=0.0)
    want_lp = token_logprobs(base, ids, labels)
    # LoRA's B starts at zero, so the wrapped model computes exactly the base function.
    wrapped = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"])).eval()
    assert generate(wrapped, tok, convs, max_new_tokens=6, temperature=0.0) == want_text
    for got, want in zip(token_logprobs(wrapped, ids, labels), want_lp):
        np.testing.assert_allclose(got, want, atol=1e-6, rtol=0)
