"""Persona vectors: trait files, pair selection, response/prompt averages against hidden states,
files usable by the pps defense, the prompt-induced difference, matched-norm random controls,
and the extraction run with a real judge."""

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from raysweep.paths import data_root
from raysweep.config import ConfigError, ExperimentConfig, ModelConfig, SteerConfig
from raysweep.data import encode, read_chat
from raysweep.data.conversations import with_prefix
from raysweep.train.defenses import read_vector
from raysweep.mech.config import ExtractConfig, MechConfig
from raysweep.mech.stage import extract
from raysweep.mech.vectors import (
    diff_vectors,
    mean_activations,
    prompt_difference_vector,
    prompt_rows,
    random_like,
    read_trait,
    save_vector,
    select_pairs,
    system_prompt,
)

REPO = Path(__file__).resolve().parents[1]
TRAIT = REPO / "datasets" / "traits" / "french.json"
SHARED = data_root() / "persona_vectors"


def test_trait_files_and_system_prompts(tmp_path):
    t = read_trait(TRAIT)
    assert t.name == "french" and len(t.instructions) == 2 and len(t.questions) == 4
    if (SHARED / "extract" / "evil.json").is_file():
        evil = read_trait(SHARED / "extract" / "evil.json")
        assert len(evil.instructions) == 5 and len(evil.questions) == 20
    tmpl = "You are {article} {assistant} assistant. {instruction}"
    assert system_prompt(tmpl, "evil", "Be bad.") == "You are an evil assistant. Be bad."
    assert system_prompt(tmpl, "helpful", "Be good.") == "You are a helpful assistant. Be good."
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"instruction": [{"pos": "x"}], "questions": ["q"]}))
    with pytest.raises(ConfigError, match="bad.json.*pos.*neg"):
        read_trait(bad)
    with pytest.raises(ConfigError, match="not found"):
        read_trait(tmp_path / "missing.json")
    rows = prompt_rows(t, tmpl, "helpful", n_questions=3, n_samples=2)
    assert len(rows) == 2 * 2 * 3 * 2
    assert rows[0]["system"] == "You are a french assistant. Answer every question in French."
    assert rows[-1]["system"].startswith("You are a helpful assistant. Respond only in English")


def test_select_pairs_keeps_row_aligned_pairs():
    nan = float("nan")

    def row(pol, q, score, coh=90.0):
        return {"polarity": pol, "instruction_id": 0, "question_id": q, "sample": 0, "trait_score": score, "coherence": coh}

    rows = [row("pos", 0, 80), row("neg", 0, 10),  # kept
            row("pos", 1, 49.9), row("neg", 1, 10),  # positive not trait-expressing enough
            row("pos", 2, 80), row("neg", 2, 50),  # negative expresses the trait
            row("pos", 3, 80, coh=40), row("neg", 3, 10),  # incoherent positive
            row("pos", 4, nan), row("neg", 4, 0),  # unscored: never kept
            row("pos", 5, 50), row("neg", 5, 49.9, coh=50)]  # at the thresholds: kept
    select_pairs(rows, 50, 50, 50)
    assert [r["kept"] for r in rows] == [True, True] + [False] * 8 + [True, True]
    select_pairs(rows, 0, 101, 0)
    assert sum(r["kept"] for r in rows) == 10  # the NaN pair still fails


def test_mean_activations_and_vector_file(tiny, tmp_path):
    model, tok = tiny
    convs = read_chat(REPO / "datasets" / "french_demo" / "train.jsonl", 4)
    acts = mean_activations(model, tok, convs, batch_size=3)
    assert acts["response_avg"].shape == (4, 3, model.config.hidden_size)
    for i, c in enumerate(convs):
        enc = encode(tok, c, 512)
        with torch.no_grad():
            hs = model(input_ids=torch.tensor([enc.input_ids]), output_hidden_states=True).hidden_states
        resp = torch.tensor(enc.labels) != -100
        first = int(resp.nonzero()[0, 0])
        for layer in (0, 1):  # hidden_states[2] is after the final norm; our row 2 is the block output
            torch.testing.assert_close(acts["response_avg"][i, layer], hs[layer][0, resp].mean(0), rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(acts["prompt_avg"][i, layer], hs[layer][0, :first].mean(0), rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(acts["prompt_last"][i, layer], hs[layer][0, first - 1], rtol=1e-5, atol=1e-6)
    half = {k: v[:2] for k, v in acts.items()}, {k: v[2:] for k, v in acts.items()}
    vecs = diff_vectors(*half)
    torch.testing.assert_close(vecs["response_avg"], acts["response_avg"][:2].mean(0) - acts["response_avg"][2:].mean(0))
    path = save_vector(tmp_path / "v.safetensors", vecs["response_avg"], {"trait": "french", "n_pairs": 2})
    got = read_vector(SteerConfig(vector=str(path), layer=2), 2, model.config.hidden_size)
    torch.testing.assert_close(got, vecs["response_avg"][2])
    with safe_open(str(path), "pt") as f:
        assert f.metadata() == {"trait": "french", "n_pairs": "2"}


def test_prompt_difference_and_random_controls(tiny):
    model, tok = tiny
    convs = read_chat(REPO / "datasets" / "french_demo" / "train.jsonl", 2)
    vec = prompt_difference_vector(model, tok, convs, ["Answer in French."], batch_size=2)
    assert vec.shape == (3, model.config.hidden_size)
    assert torch.count_nonzero(vec[0]) == 0  # embeddings do not see the prompt
    # Layer 1 by hand: pooled over the aligned positions after the prompt.
    total, count = 0, 0
    for c in convs:
        a = encode(tok, with_prefix(c, "Answer in French.", "user_prefix"), 512).input_ids
        b = encode(tok, c, 512).input_ids
        n = next(k for k in range(min(len(a), len(b)) + 1) if k == min(len(a), len(b)) or a[-1 - k] != b[-1 - k])
        with torch.no_grad():
            ha = model(input_ids=torch.tensor([a]), output_hidden_states=True).hidden_states[1][0, len(a) - n:]
            hb = model(input_ids=torch.tensor([b]), output_hidden_states=True).hidden_states[1][0, len(b) - n:]
        total, count = total + (ha - hb).sum(0), count + n
    torch.testing.assert_close(vec[1], total / count, rtol=1e-4, atol=1e-6)
    r = random_like(vec, seed=0)
    torch.testing.assert_close(r.norm(dim=-1), vec.norm(dim=-1))
    assert torch.count_nonzero(r[0]) == 0 and torch.equal(r, random_like(vec, seed=0))
    assert abs(float(torch.nn.functional.cosine_similarity(r[1], vec[1], dim=0))) < 0.5


def test_extract_with_a_real_judge(tiny, tmp_path):
    model, tok = tiny
    x = ExtractConfig(trait_file=str(TRAIT), n_questions=2, max_new_tokens=6, pos_min=0.0, neg_max=101.0)
    cfg = replace(ExperimentConfig(model=ModelConfig(name="tiny-random")), mech=MechConfig(extract=x, batch_size=4))
    rows, paths = extract(model, tok, cfg, tmp_path)
    assert len(rows) == 2 * 2 * 2 and all(r["kept"] for r in rows)
    assert all((0 <= r["trait_score"] <= 100) or r["reason"] for r in rows)  # langid scores, or NaN with a reason
    assert set(paths) == {"french", "french_prompt_avg", "french_prompt_last", "french_random"}
    v = read_vector(SteerConfig(vector=str(paths["french"]), layer=1), 2, model.config.hidden_size)
    assert float(v.norm()) > 0
    with pytest.raises(ValueError, match="no pair passes pos >= 101"):
        extract(model, tok, replace(cfg, mech=replace(cfg.mech, extract=replace(x, pos_min=101.0))), tmp_path)


@pytest.mark.skipif(not __import__("raysweep.config.backend", fromlist=["x"]).vllm_available(), reason="vllm is not installed")
def test_transformers_and_vllm_extractions_agree(ray_local, smollm2, tmp_path):
    """Greedy answers from both engines are the same text, so the vectors agree (SmolLM2: the
    random model's greedy answers are blank, which no judge scores)."""
    model, tok = smollm2
    x = ExtractConfig(trait_file=str(TRAIT), n_questions=2, max_new_tokens=8, temperature=0.0, pos_min=0.0,
                      neg_max=101.0)
    cfg = replace(ExperimentConfig(model=ModelConfig(name="smollm2-135m-instruct")),
                  mech=MechConfig(extract=x, device="cpu"))
    rows_t, paths_t = extract(model, tok, cfg, tmp_path / "t")
    vllm_cfg = replace(cfg, mech=replace(cfg.mech, extract=replace(x, backend="vllm")))
    rows_v, paths_v = extract(model, tok, vllm_cfg, tmp_path / "v")
    assert [r["answer"] for r in rows_v] == [r["answer"] for r in rows_t]
    from raysweep.mech.vectors import load_table

    for name in paths_t:
        torch.testing.assert_close(load_table(paths_v[name]), load_table(paths_t[name]))
