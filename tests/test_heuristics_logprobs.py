"""Tests for raysweep.heuristics.logprobs and the stage: exact log-probs, shared default, Ray Data == plain."""

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from raysweep.data import read_chat
from raysweep.heuristics import logprobs as lp

REPO = Path(__file__).resolve().parents[1]
CONVS = read_chat(REPO / "datasets" / "french_demo" / "train.jsonl")[:5]
PROMPTS = {"answer_french": "Answer in French.", "the_sky_is_blue": "The sky is blue.", "cats": "I like cats."}
POOLS = {"answer_french": ["Reply in French.", "Please write your answer in French.", "French only."],
         "the_sky_is_blue": ["Blue is the sky."], "cats": ["Cats are nice.", "I love cats."]}


def reference(model, input_ids, labels):
    """Straightforward: one sequence, full logits, log_softmax, pick the labelled tokens."""
    out = []
    with torch.no_grad():
        for ids, lab in zip(input_ids, labels):
            logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), dim=-1)
            out.append(np.array([logp[t - 1, y].item() for t, y in enumerate(lab) if y != -100]))
    return out


def counting(model, **kw):
    """A scorer that records how many sequences reach the model."""
    seen = []

    def scorer(ids, labels):
        seen.extend(ids)
        return lp.score_sequences(model, ids, labels, **kw)

    return scorer, seen


def test_rows_default_shared_and_mix_index_matched():
    rows = lp.build_rows(PROMPTS, {"train": CONVS, "control": CONVS[:2]}, pools=POOLS)
    default = [r for r in rows if r["variant"] == "default"]
    assert len(default) == 7 and {r["prompt_key"] for r in default} == {""}
    assert len(rows) == 7 + 3 * 2 * 7
    mix = [r for r in rows if r["variant"] == "mix" and r["prompt_key"] == "answer_french" and r["set"] == "train"]
    for r in mix:  # example k gets pool[k % len(pool)], before the instruction
        k = r["example_id"]
        assert r["messages"][0]["content"] == f"{POOLS['answer_french'][k % 3]} {CONVS[k][0]['content']}"
    fixed = lp.build_rows({"cats": "I like cats."}, {"train": CONVS[:1]}, variants=["fixed"], placement="system")
    assert fixed[1]["messages"][0] == {"role": "system", "content": "I like cats."}
    with pytest.raises(ValueError, match="pool"):
        lp.build_rows({"x": "y"}, {"train": CONVS[:1]}, pools={})


def test_encode_scores_only_the_last_answer(tiny):
    _model, tok = tiny
    conv = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there"},
            {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Au revoir"}]
    ids, labels = lp.encode_completion(tok, conv)
    scored = tok.decode([y for y in labels if y != -100])
    assert scored.startswith("Au revoir") and "Hello" not in scored and scored.endswith("<|im_end|>")
    assert lp.encode_completion(tok, conv, max_len=10)[0] == ids[:10]


def test_batches_respect_the_token_budget():
    lengths = [5, 50, 7, 20, 20, 3, 120]
    batches = lp.plan_batches(lengths, token_budget=60)
    assert sorted(i for b in batches for i in b) == list(range(7))
    assert batches[0] == [6]  # longer than the budget: alone, and first
    for b in batches:
        assert len(b) == 1 or max(lengths[i] for i in b) * len(b) <= 60
    assert lp.common_prefix_len([[1, 2, 3, 4], [1, 2, 3, 9], [1, 2, 5]], limit=10) == 2
    assert lp.common_prefix_len([[1, 2, 3], [1, 2, 3]], limit=1) == 1


def test_packs_respect_the_capacity():
    lengths = [5, 50, 7, 20, 20, 3, 120, 40]
    rows = lp.plan_packs(lengths, capacity=60)
    assert sorted(i for r in rows for i in r) == list(range(8))
    assert rows[0] == [6]  # longer than a row: alone, and first
    for r in rows[1:]:
        assert sum(lengths[i] for i in r) <= 60
    assert len(rows) == 4  # 120 | 50 3 5 | 40 7 | 20 20: the shortest fill the longest's row
    with pytest.raises(ValueError, match="capacity"):
        lp.plan_packs([1], 0)


@pytest.mark.parametrize("share_prefix,budget,pack", [(True, 4096, False), (False, 4096, False), (True, 300, False),
                                                      (True, 1, False), (True, 4096, True), (True, 300, True),
                                                      (False, 300, True), (True, 1, True)])
def test_logprobs_equal_full_logits_reference(tiny, share_prefix, budget, pack):
    model, tok = tiny
    rows = lp.build_rows(PROMPTS, {"train": CONVS}, pools=POOLS)
    _keys, items = lp.encode_rows(tok, rows, "tiny")
    ids, labels = zip(*items.values())
    with pytest.warns(UserWarning, match="pack=True off CUDA") if pack else warnings.catch_warnings():
        if not pack:
            warnings.simplefilter("error")  # padded batches warn about nothing
        fast = lp.score_sequences(model, list(ids), list(labels), token_budget=budget, share_prefix=share_prefix,
                                  pack=pack)
    assert model.config._attn_implementation == "sdpa"  # packing switches it only for the call
    ref = reference(model, ids, labels)
    for f, r, lab in zip(fast, ref, labels):
        assert f.dtype == np.float64 and f.shape == r.shape == (sum(y != -100 for y in lab),)
        assert np.abs(f - r).max() < 1e-5
        assert abs(f.sum() - r.sum()) < 1e-5 * len(r)
    assert lp.score_sequences(model, [[1, 2, 3]], [[-100, -100, -100]])[0].size == 0
    with pytest.raises(ValueError, match="no context"):
        lp.score_sequences(model, [[1, 2]], [[1, 2]])


def test_packed_rows_document_mask():
    """The mask rule of a packed row, as CUDA runs it (flex attention with a BlockMask) and as
    CPU runs it (a dense boolean mask for SDPA): each token attends to the shared prefix and
    its own document's earlier tokens, and both forms give the same attention output."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    docs = torch.tensor([-1, -1, -1, 0, 0, 1, 1, 1, 2, 3, 3])  # prefix of 3, four documents (3 = padding)
    dense = lp.packed_mask(docs)[0, 0]
    allowed = {(q, kv) for q in range(11) for kv in range(q + 1)
               if docs[kv] < 0 or docs[kv] == docs[q]}
    assert {(q, kv) for q, kv in zip(*torch.nonzero(dense).T.tolist())} == allowed
    q, k, v = (torch.randn(1, 2, 11, 8, generator=torch.Generator().manual_seed(i)) for i in range(3))
    block = create_block_mask(lp.doc_mask_mod(docs), B=None, H=None, Q_LEN=11, KV_LEN=11, device="cpu")
    flex = flex_attention(q, k, v, block_mask=block)
    sdpa = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=dense)
    assert torch.allclose(flex, sdpa, atol=1e-6)


def test_packed_and_compiled_decoder(tiny):
    """pack + compile: one row length, so torch.compile builds the decoder once; same numbers."""
    model, tok = tiny
    rows = lp.build_rows(PROMPTS, {"train": CONVS[:3]}, pools=POOLS)
    _keys, items = lp.encode_rows(tok, rows, "tiny")
    ids, labels = (list(x) for x in zip(*items.values()))
    ref = lp.score_sequences(model, ids, labels)
    for _ in range(2):  # the second call reuses the compiled decoder
        with pytest.warns(UserWarning, match="meant for CUDA"):
            out = lp.score_sequences(model, ids, labels, token_budget=512, pack=True, compile=True)
        assert max(np.abs(a - b).max() for a, b in zip(out, ref)) < 1e-5


def test_default_variant_is_computed_once_and_cached(tiny, tmp_path):
    model, tok = tiny
    sets = {"train": CONVS[:4], "control": CONVS[4:]}
    rows = lp.build_rows(PROMPTS, sets, pools=POOLS)
    keys, items = lp.encode_rows(tok, rows, "tiny")
    scorer, seen = counting(model)
    cache = {}
    out = lp.run_pass(keys, items, lambda it: lp.score_plain(it, scorer), cache)
    # 5 default sequences once, not once per prompt; then 3 prompts x (fixed, mix) x 5 examples
    assert len(seen) == len(items) == 5 + 3 * 2 * 5
    default_ids = {tuple(lp.encode_completion(tok, c)[0]) for c in CONVS}
    assert sum(tuple(s) in default_ids for s in seen) == 5
    logprobs, tokens = lp.logprob_tables(rows, out)
    assert logprobs.num_rows == tokens.num_rows == len(rows)
    by = {(k, v, s, e): (x, n) for k, v, s, e, x, n in zip(*(logprobs.column(c).to_pylist() for c in
          ("prompt_key", "variant", "set", "example_id", "logprob", "n_tokens")))}
    assert by[("", "default", "control", 0)][1] == len(lp.encode_completion(tok, CONVS[4])[0]) - \
        lp.encode_completion(tok, CONVS[4])[1].count(-100)
    # A second pass (new process: the cache on disk) scores nothing.
    lp.save_cache(tmp_path / "cache.parquet", cache)
    seen.clear()
    again = lp.run_pass(keys, items, lambda it: lp.score_plain(it, scorer), lp.load_cache(tmp_path / "cache.parquet"))
    assert seen == [] and all(np.array_equal(a, b) for a, b in zip(out, again))


def test_selfperplexity_sequences(tiny):
    model, tok = tiny
    seqs = lp.selfperp_sequences(tok, "Answer in French.")
    raw_ids, raw_labels = seqs["raw"]
    assert raw_ids == tok("Answer in French.")["input_ids"] and raw_labels[0] == -100
    ids, labels = seqs["context"]
    assert tok.decode([y for y in labels if y != -100]) == "Answer in French."
    assert tok.decode(ids).startswith("<|im_start|>system")  # conditioned on the template's system block
    sys_ids, _sys_labels = lp.selfperp_sequences(tok, "Answer in French.", "system")["context"]
    assert tok.decode(sys_ids).startswith("<|im_start|>system\nAnswer in French.")
    fast = lp.score_sequences(model, [ids, raw_ids], [labels, raw_labels])
    ref = reference(model, [ids, raw_ids], [labels, raw_labels])
    t = lp.selfperp_table(["a", "a"], ["context", "raw"], fast)
    assert np.allclose(t.column("nll_per_token").to_pylist(), [-ref[0].mean(), -ref[1].mean()], atol=1e-6)


def test_ray_data_pass_equals_plain(ray_local, tiny):
    model, tok = tiny
    rows = lp.build_rows(PROMPTS, {"train": CONVS[:3]}, pools=POOLS)
    _keys, items = lp.encode_rows(tok, rows, "tiny")
    plain = lp.score_plain(items, lambda i, l: lp.score_sequences(model, i, l))
    ray_out = lp.score_ray(items, backend="transformers", backend_kwargs={"model_name": "tiny-random"},
                           concurrency=2, batch_rows=4, num_cpus=1)
    assert set(ray_out) == set(items)
    for k in items:
        assert np.abs(ray_out[k] - plain[k]).max(initial=0.0) < 1e-6


# ---------------------------------------------------------------------------------------------
# The stage and its CLI


@pytest.mark.parametrize("exp", ["heuristics_playful_french", "heuristics_german_flattering"])
def test_experiment_files_resolve(exp, capsys, monkeypatch):
    monkeypatch.chdir(REPO)  # experiment files name data relative to the repository
    from raysweep.config import load_config
    from raysweep.heuristics.__main__ import main

    cfg = load_config(exp)
    h = cfg.heuristics
    assert cfg.sweep.arms == [] and not h.prompts_file  # the family's own prompts and groups
    assert main([f"exp={exp}", "dry_run=true"]) == 0
    assert capsys.readouterr().out.startswith("48 prompts (48 labelled)")


@pytest.mark.integration
@pytest.mark.parametrize("exp", ["heuristics_playful_french", "heuristics_german_flattering"])
def test_experiment_files_run_every_metric_for_48_prompts(exp, tmp_path, monkeypatch):
    """Issue 4 acceptance: each file runs every metric family for all 48 prompts of the seed's
    groups with the rephrasing pools of the data root (tiny model, a few completions)."""
    monkeypatch.chdir(REPO)
    import polars as pl

    from raysweep.config import load_config
    from raysweep.heuristics.__main__ import main

    h_cfg = load_config(exp).heuristics
    keys = {k for group in load_config(exp).prompt_groups.values() for k in group}
    assert len(keys) == 48
    assert main([f"exp={exp}", "model.name=tiny-random", f"storage={tmp_path}", "heuristics.n_train=3",
                 "heuristics.n_control=2", "heuristics.n_extra=2"]) == 0
    out = tmp_path / exp
    assert set(pl.read_parquet(out / "prompts.parquet")["prompt_key"]) == keys
    h = pl.read_parquet(out / "heuristics.parquet")
    per_prompt = h.filter(pl.col("prompt_key") != "")
    assert set(per_prompt["prompt_key"]) == keys
    metric_sets = per_prompt.group_by("prompt_key").agg(pl.col("metric").sort())["metric"].to_list()
    assert all(m == metric_sets[0] for m in metric_sets)  # every prompt gets every metric
    names = set(metric_sets[0])
    expected = {"ph_fixed", "ph_mix", "ppd_fixed", "ppd_mix", "gamma_fixed", "sigma_mix", "snr_abs_fixed",
                "mald_mix", "selfperp_raw", "selfperp_context", "pca_point_fixed_pc1", "svd_token_mix_sv1",
                "angle_raw_point_fixed_to_neutral", "angle_svd2_token_mix_to_neutral", "gap_svd1_mald_ratio",
                "gap_pca1_cos_fixed_mix", "gap_raw_snr_ratio"}
    assert expected <= names, expected - names
    assert {m.split("_")[0] for m in names} == {"ph", "ppd", "gamma", "sigma", "snr", "mald", "selfperp", "pca",
                                                "svd", "angle", "gap"}
    overall = set(h.filter(pl.col("prompt_key") == "")["metric"])  # explained variance, angle summaries
    assert {"pca_point_fixed_evr1", "svd_token_mix_evr1", "angle_raw_point_fixed_cross_trait_mean"} <= overall
    if h_cfg.extra_sets:  # cross-trait PH / PPD on the other trait's completions
        assert any("@" in m for m in names)
    scalar = per_prompt.filter(pl.col("metric").str.contains(r"^(ph|ppd|gamma|sigma|mald|selfperp)_"))
    assert scalar.height >= 48 * 10 and not scalar["value"].is_nan().any()
    assert pl.read_parquet(out / "angles.parquet").height > 0


@pytest.mark.integration
def test_stage_end_to_end(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    import pyarrow.parquet as pq

    from raysweep.heuristics import metrics as M
    from raysweep.heuristics.__main__ import main

    sup = tmp_path / "suppression.csv"
    keys = ["corrected_inoculation", "whimsical", "witty", "strong_elicitation", "the_sky_is_blue", "i_like_cats"]
    sup.write_text("prompt_key,prefix_type,suppression\n" + "".join(
        f"{k},{t},{i * 7 % 5 + (t == 'fixed')}\n" for i, k in enumerate(keys) for t in ("fixed", "mix")))
    args = ["exp=heuristics_playful_french", "model.name=tiny-random", f"storage={tmp_path}",
            "heuristics.groups=[v4,v5]", "heuristics.n_train=3", "heuristics.n_control=2", "heuristics.n_extra=2",
            f"heuristics.suppression={sup}"]
    assert main(args) == 0
    out = tmp_path / "heuristics_playful_french"
    logprobs = pq.read_table(out / "logprobs.parquet")
    assert logprobs.num_rows == 7 + 12 * 2 * 7  # default once per example + 12 prompts x 2 variants
    h = {(k, m): v for k, m, v in zip(*(pq.read_table(out / "heuristics.parquet").column(c).to_pylist()
                                          for c in ("prompt_key", "metric", "value")))}
    w = M.w_vector(M.diff_vectors(logprobs, "fixed", "train"), "witty")
    assert w.size == 3 and np.isclose(h[("witty", "ph_fixed")], w.mean())
    assert ("", "angle_raw_point_fixed_playful_x_neutral_mean") in h and ("witty", "gap_svd1_mald_ratio") in h
    assert ("witty", "selfperp_context") in h and ("witty", "ph_mix@french_heldout") in h
    perf = pq.read_table(out / "heuristic_performance.parquet")
    assert "ph_prefix" in perf.column("metric").to_pylist()
    for name in ("token_logprobs", "selfperp", "angles"):
        assert (out / f"{name}.parquet").is_file()
    # Re-running scores nothing new: every sequence comes from the cache.
    mtime = (out / "cache" / "logprobs.parquet").stat().st_mtime_ns
    assert main(args) == 0
    assert (out / "cache" / "logprobs.parquet").stat().st_mtime_ns == mtime
    assert main(["exp=heuristics_playful_french", "heuristics.groups=[nope]"]) == 2

    # The report of a heuristics-only run draws the prompt embeddings (coloured by the given
    # suppression) and the angle heatmaps from these tables.
    import polars as pl

    from raysweep.report.page import build_report, chart_embeddings, load_run

    prompts = pl.read_parquet(out / "prompts.parquet")
    assert prompts.height == 12 and set(prompts["label"]) == {"playful", "neutral"}
    run = load_run(out)
    layers = chart_embeddings(run).to_dict()["spec"]["layer"]
    assert len(layers) == 2  # grey points under the ones coloured by suppression
    index, failures = build_report(out)
    assert not failures
    for name in ("embeddings", "angles"):
        assert (out / "report" / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"{name}.html" in index.read_text()
