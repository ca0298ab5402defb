"""The bf16 tier: every stage on the tiny model in bfloat16 on CPU, compared with the same stage in fp32.

bfloat16 keeps 8 significant bits (~2.4 decimal digits, unit roundoff 2^-8 = 0.0039), so a
bf16 run cannot reproduce fp32 to the bit; each comparison holds it to a named tolerance.
Every tolerance below was set from the bf16-vs-fp32 difference measured on this model
(quoted in its comment) with ~3-10x headroom, and, where cheap, the test also shows that a
deliberately wrong result (another steering coefficient, the defense switched off, another
answer) lands outside it, so a tolerance cannot silently hide a real bug.

Besides agreeing with fp32, every stage must keep the residual stream in bf16: the output of
the embeddings and of every decoder layer is recorded (`residual_dtypes`, and
`loaded_models_residual` for stages that load their own model) and must be bf16.
Float32 is only used where it is numerically needed (log-softmax / cross-entropy, LoRA
adapter weights for AdamW, gradient projections, accumulated means of activations).

The tiny model is a seeded random 2-layer Llama: its next-token distribution is nearly
uniform (loss ~ ln 49152 = 10.80), logits are O(1) and activations small, so absolute
differences are small too; tolerances are stated on the scale of each quantity.
"""

import contextlib
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from raysweep.paths import data_root
from raysweep.config import (
    DefenseConfig,
    EvalConfig,
    GradConfig,
    IPConfig,
    ModelConfig,
    SteerConfig,
    load_config,
)
from raysweep.data import encode, read_chat, shuffled
from raysweep.data.conversations import with_prefix
from raysweep.train.models import model_layers
from test_trial import tiny_config  # the trial config of the trial tests (tiny-random, 2 steps)

pytestmark = [pytest.mark.bf16, pytest.mark.integration]

REPO = Path(__file__).resolve().parents[1]
DATA = data_root()
BF16 = torch.bfloat16
PROMPT = "Answer in French."

# --- tolerances --------------------------------------------------------------------------
# Each: what it bounds, the bf16-vs-fp32 difference measured on this box, and what a wrong
# result (checked in the test) does.
#
# Training loss per step (run_trial, 2 AdamW steps): a token mean of a float32 cross-entropy
# over bf16 logits, ~10.8 nats. Measured <= 9e-5 (IP 9.1e-5, PPS 7.0e-5, grad 6.3e-5).
# Wrong: the defense off moves step 1 by 3.1e-3 (IP) and 2.9e-2 (PPS).
TRAIN_LOSS_TOL = 5e-4  # nats, absolute
# Gradient norm per step (float32 LoRA adapters fed bf16 activations). Measured relative
# <= 2.5e-3 (IP 2.5e-3, PPS 1.3e-3, grad 7.2e-4). Wrong: amplify off moves step 1 by 21%.
GRAD_NORM_RTOL = 1e-2  # relative
# Held-out logprob (mean per-token logprob of each held-out completion, steps 0 and 2).
# Measured <= 5.1e-4. Wrong: another example's value is >= 1.1e-2 away.
HELDOUT_TOL = 2e-3  # nats, absolute
# Next-token logits (O(1) on the random model). Measured max |bf16 - fp32| 4.5e-3 over the
# vocabulary; fp32's greedy margin (top-1 minus top-2) is >= 0.017 with steering, 0.44 without,
# so bf16 must pick the same greedy tokens.
LOGIT_TOL = 1.5e-2  # absolute
# Per-token log-probabilities (generation.token_logprobs, the heuristics pass): bf16 roundoff
# of the hidden state and the head. Measured max 3.7e-3 per token.
TOKEN_LP_TOL = 1e-2  # nats, absolute, any single token
# Means over a completion's tokens (token_logprobs per sequence, heuristics mean_logprob,
# self-perplexity): per-token errors mostly average out. Measured <= 7.5e-4 (self-perplexity,
# a mean over ~10 prompt tokens; mean_logprob 3.9e-4).
MEAN_LP_TOL = 2e-3  # nats, absolute
# PH / PPD / MALD: means of w = lp_prefixed - lp_default, whose common errors cancel.
# Measured 2.0e-4. They are small on the random model (|PH| ~1e-3: a prefix barely moves
# its near-uniform predictions), so this must stay well below them. Wrong: another
# prompt's PH is up to 2.0e-3 away (checked).
PH_TOL = 6e-4  # nats, absolute
# Mechanistic passes: loss per sequence (mean CE over assistant tokens). Measured <= 1.6e-4
# (1.4e-4 through the whole mech stage). Wrong: coefficient 1.5 in place of 4 (checked).
MECH_LOSS_TOL = 1e-3  # nats, absolute
# Token-averaged cosines of bf16 gradients (float32 reductions): grad_cosine including the
# batched coefficient sweep, and the IP-vs-PPS similarity. Measured <= 1.6e-4. Wrong:
# coefficient 1.5 in place of 4 moves the cosine with the steering vector by 1.2e-2 (checked).
COSINE_TOL = 1e-3  # absolute, on [-1, 1]
# Gradient-difference PCA over 3 sequences: explained fractions and the mean difference's
# cosine with the references (a small-sample decomposition amplifies the gradient error).
# Measured <= 1.1e-3 (explained 1.1e-3, mean-difference cosine 7.3e-4).
PCA_TOL = 5e-3  # absolute
# Relative L2 error of mean activations and extracted vectors (float32 means of bf16
# activations). Measured <= 5.3e-3 for means, 1.2e-2 for differences of means (cancellation:
# prompt_last, ip_diff). Wrong: another position kind's vector is O(1) away (checked).
VECTOR_RTOL = 5e-2  # relative, ||bf16 - fp32|| / ||fp32||
# Cosine of a bf16 vector / parameter gradient with its fp32 counterpart. Measured
# 1 - cos <= 3e-5 (parameter gradient under gradient manipulation).
MIN_COSINE = 0.999
# Activation projections on unit vectors, relative to the largest projection (one can be
# near zero). Measured 1.9e-3 (as the relative L2 error of activations, VECTOR_RTOL's 5e-3).
PROJECTION_RTOL = 1e-2
# Gradient manipulation (neutralize): the new gradient is formed in float32 and rounded once
# to bf16, so what is left along v is roundoff. Measured max |cos(g, v)| 6.2e-4 per token
# (before manipulation: ~0.1 in 64 dimensions, checked).
NEUTRAL_COS_TOL = 5e-3
# Local judge: log p(score string | judge prompt) for '0'..'100' (a KV cache and a 4D tree
# mask in bf16). Measured <= 4.2e-3 nats. Wrong: candidates shifted by one (checked).
JUDGE_LP_TOL = 1.5e-2  # nats
# Its 0-100 score (a probability-weighted mean; ~4.4 on the random model). The logprob errors
# are nearly common to all candidates and cancel in the normalisation: measured 8.4e-4.
# Wrong: the other answer moves it by 4e-3; candidates '1'..'9' shifted by one: 0.44 nats.
JUDGE_SCORE_TOL = 5e-3  # score points


# --- shared models and helpers -----------------------------------------------------------


@pytest.fixture(scope="module")
def tiny16():
    """(model, tokenizer) of tiny-random in bfloat16, once for this module."""
    from raysweep.train.models import load_model

    model, tok = load_model("tiny-random", "bfloat16")
    assert model.dtype == BF16
    return model, tok


@pytest.fixture(scope="module")
def convs():
    return read_chat(REPO / "datasets" / "french_demo" / "train.jsonl", 3)


def _record_residual(model, seen: set) -> list:
    """Hooks adding the dtype of the embedding output and of every decoder layer's output to `seen`."""
    def hook(module, args, output):
        seen.add((output[0] if isinstance(output, tuple) else output).dtype)

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return [m.register_forward_hook(hook) for m in [base.get_input_embeddings(), *model_layers(model)]]


@contextlib.contextmanager
def residual_dtypes(model):
    """The set of residual-stream dtypes `model` produces inside the block."""
    seen: set = set()
    handles = _record_residual(model, seen)
    try:
        yield seen
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def loaded_models_residual():
    """For stages that load their own model (trial, heuristics, mech stage): every model that
    `raysweep.train.models.load_model` loads inside the block records its residual dtypes in the set."""
    import raysweep.train.models

    seen: set = set()
    real = raysweep.train.models.load_model

    def load(*args, **kwargs):
        model, tok = real(*args, **kwargs)
        _record_residual(model, seen)
        return model, tok

    raysweep.train.models.load_model = load  # the stages import it from raysweep.train.models when they run
    try:
        yield seen
    finally:
        raysweep.train.models.load_model = real


def table(seed: int, scale: float = 1.0) -> torch.Tensor:
    """A [num_layers+1, hidden] float32 vector table (the layout of mech and PPS vector files)."""
    return torch.randn(3, 64, generator=torch.Generator().manual_seed(seed)) * scale


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def report(name: str, measured: float, tol: float) -> None:
    print(f"\n[bf16] {name}: measured {measured:.3g} (tolerance {tol:g})")


# --- the steering hook itself ------------------------------------------------------------


def test_steering_with_per_row_coefficients_keeps_bf16(tiny16):
    """The exact crash of `python -m raysweep.mech exp=pps_vs_ip_tiny model.dtype=bfloat16`:
    a float32 per-row coefficient tensor promoted the steered layer's output to float32 and
    the next layer's bf16 weights rejected it ("expected m1 and m2 to have the same dtype")."""
    from raysweep.train.defenses import steer

    model, tok = tiny16
    ids = torch.tensor([tok.encode("Hello there, how are you today?")] * 3)
    v = table(3)[1]
    coefs = torch.tensor([0.5, 1.5, 4.0]).view(-1, 1, 1)  # one coefficient per row, float32
    layer = model_layers(model)[0]

    def layer1_output(steering):
        out = []
        with torch.no_grad(), steer(model, steering), residual_dtypes(model) as seen:
            # Registered after steer's hook: sees the output as the next layer gets it.
            h = layer.register_forward_hook(lambda m, a, o: out.append(o[0] if isinstance(o, tuple) else o))
            try:
                model(input_ids=ids)
            finally:
                h.remove()
        assert seen == {BF16}
        return out[0]

    plain = layer1_output([])
    steered = layer1_output([(v, 1, coefs)])
    assert steered.dtype == BF16
    assert torch.equal(steered, plain + (coefs * v).to(BF16))  # coef * v formed in float32, rounded once
    assert torch.equal(layer1_output([(v, 1, 1.5)])[1], steered[1])  # a float coefficient: the same rows


# --- training trials ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def vector_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("vec") / "v.safetensors"
    save_file({"v": table(1, 5.0)}, path)  # as test_trial's PPS vector
    return path


DEFENSES = ("ip", "pps", "grad")


def defense(kind: str, vector: Path) -> DefenseConfig:
    if kind == "ip":
        return DefenseConfig(kind="ip", ip=IPConfig(text=PROMPT))
    if kind == "pps":
        return DefenseConfig(kind="pps", pps=[SteerConfig(vector=str(vector), layer=1, coef=4.0)])
    if kind == "grad":
        # amplify (not neutralize): on the random model it changes the step's gradient norm by
        # 27% (neutralize: 0.5%), so switching it off is visible far outside the tolerance.
        return DefenseConfig(grad=GradConfig(mode="amplify", vector=str(vector)))
    return DefenseConfig()


@pytest.fixture(scope="module")
def trials(tmp_path_factory, vector_file):
    """Each defense trained and evaluated in fp32 and in bf16, plus an fp32 control (no defense):
    {(kind, dtype): {"losses", "heldout", "completions", "scores"}} and the residual dtypes seen."""
    from raysweep.train.trial import run_trial

    root = tmp_path_factory.mktemp("trials")
    out, seen = {}, {}
    for dtype in ("float32", "bfloat16"):
        for kind in DEFENSES + (("none",) if dtype == "float32" else ()):
            cfg = tiny_config(defense(kind, vector_file))
            conditions = ["default", "training"] + (["reinjected"] if kind == "pps" else [])
            cfg = replace(cfg, model=ModelConfig(name="tiny-random", dtype=dtype),
                          eval=replace(cfg.eval, conditions=conditions))
            with loaded_models_residual() as dtypes:
                run_trial(cfg, root / dtype, kind, kind)
            d = root / dtype / "trials" / kind
            read = lambda name: pl.concat([pl.read_parquet(d / "eval" / f"step_{s}.{name}.parquet") for s in (0, 2)])
            out[(kind, dtype)] = {
                "losses": pl.read_parquet(d / "losses.parquet").sort("step"),
                "heldout": read("heldout_logprob").sort("step", "example_id"),
                "completions": read("completions").sort("step", "condition", "question_id", "sample"),
                "scores": read("scores").sort("step", "condition", "question_id", "sample", "trait"),
            }
            seen[(kind, dtype)] = dtypes
    return out, seen


@pytest.mark.parametrize("kind", DEFENSES)
def test_training_trial_matches_fp32(trials, kind):
    runs, seen = trials
    assert seen[(kind, "bfloat16")] == {BF16} and seen[(kind, "float32")] == {torch.float32}
    a, b = runs[(kind, "bfloat16")]["losses"], runs[(kind, "float32")]["losses"]
    assert a["step"].to_list() == b["step"].to_list() == [1, 2]
    assert a["n_tokens"].to_list() == b["n_tokens"].to_list()
    dloss = max(abs(x - y) for x, y in zip(a["loss"], b["loss"]))
    dnorm = max(abs(x - y) / y for x, y in zip(a["grad_norm"], b["grad_norm"]))
    report(f"trial {kind}: loss per step", dloss, TRAIN_LOSS_TOL)
    report(f"trial {kind}: grad norm per step (relative)", dnorm, GRAD_NORM_RTOL)
    assert dloss < TRAIN_LOSS_TOL and dnorm < GRAD_NORM_RTOL
    # A wrong defense (here: none at all) is far outside the tolerances.
    c = runs[("none", "float32")]["losses"]
    if kind in ("ip", "pps"):  # the first step's loss sees the defense
        report(f"trial {kind}: defense off, step-1 loss moves by", abs(c["loss"][0] - b["loss"][0]), TRAIN_LOSS_TOL)
        assert abs(c["loss"][0] - b["loss"][0]) > 5 * TRAIN_LOSS_TOL
    else:  # gradient manipulation: the same forward, another gradient
        assert c["loss"][0] == pytest.approx(b["loss"][0], abs=1e-9)
        off = abs(c["grad_norm"][0] - b["grad_norm"][0]) / b["grad_norm"][0]
        report(f"trial {kind}: manipulation off, step-1 grad norm moves by (relative)", off, GRAD_NORM_RTOL)
        assert off > 5 * GRAD_NORM_RTOL


@pytest.mark.parametrize("kind", DEFENSES)
def test_in_trial_evaluation_matches_fp32(trials, kind):
    runs, _ = trials
    a, b = runs[(kind, "bfloat16")], runs[(kind, "float32")]
    # Held-out logprob at step 0 (base model) and at the final step (after the LoRA update).
    dheld = float((a["heldout"]["logprob"] - b["heldout"]["logprob"]).abs().max())
    report(f"trial {kind}: held-out logprob", dheld, HELDOUT_TOL)
    assert a["heldout"]["n_tokens"].to_list() == b["heldout"]["n_tokens"].to_list()
    assert dheld < HELDOUT_TOL
    # Pairing each example with another's value is far outside the tolerance.
    held = b["heldout"]["logprob"].to_numpy()
    wrong = float(np.abs(held - np.roll(held, 1)).min())
    report(f"trial {kind}: another example's held-out logprob (min)", wrong, HELDOUT_TOL)
    assert wrong > 3 * HELDOUT_TOL
    # Greedy answers: fp32's greedy margin on this model (>= 0.017 with steering) is well above
    # bf16's logit error (<= 0.0045; test_greedy_generation_and_token_logprobs): the same text.
    key = ["step", "condition", "question_id", "sample"]
    cols = key + ["prompt", "completion"]
    assert a["completions"].select(cols).equals(b["completions"].select(cols))
    # Same answers, so the judge (langid) gives the same scores, NaN where it cannot score.
    sa, sb = a["scores"], b["scores"]
    assert sa.select(key + ["trait", "reason"]).equals(sb.select(key + ["trait", "reason"]))
    assert all((x == y) or (math.isnan(x) and math.isnan(y)) for x, y in zip(sa["score"], sb["score"]))
    if kind == "pps":  # the steered conditions answer differently from the default one
        comp = b["completions"].filter(pl.col("step") == 0)
        by = {c: comp.filter(pl.col("condition") == c)["completion"].to_list() for c in ("default", "training", "reinjected")}
        assert by["training"] == by["reinjected"] != by["default"]
        assert any(not math.isnan(x) for x in sb["score"])  # langid scores the steered answers


def test_greedy_generation_and_token_logprobs(tiny, tiny16, convs):
    """generation.generate / token_logprobs directly: bf16's logit error is below fp32's greedy
    margin at every step, so greedy answers are the same text; per-token logprobs agree."""
    from raysweep.train.defenses import steer
    from raysweep.eval.generation import generate, token_logprobs

    (m32, tok), (m16, _) = tiny, tiny16
    questions = [c[:-1] for c in convs]
    v = table(1, 5.0)[1]
    for steering in ([], [(v, 1, 4.0)]):
        with steer(m32, steering):
            a32 = generate(m32, tok, questions, max_new_tokens=6, temperature=0.0)
        with steer(m16, steering), residual_dtypes(m16) as seen:
            a16 = generate(m16, tok, questions, max_new_tokens=6, temperature=0.0)
        assert seen == {BF16}
        # Along fp32's greedy path: bf16's logit error vs the margin between fp32's top two tokens.
        err, margin = 0.0, math.inf
        for q in questions:
            ids = tok(tok.apply_chat_template(q, tokenize=False, add_generation_prompt=True), add_special_tokens=False)["input_ids"]
            for _ in range(6):
                with torch.no_grad(), steer(m32, steering), steer(m16, steering):
                    l32 = m32(input_ids=torch.tensor([ids])).logits[0, -1]
                    l16 = m16(input_ids=torch.tensor([ids])).logits[0, -1].float()
                top = l32.topk(2).values
                err, margin = max(err, float((l16 - l32).abs().max())), min(margin, float(top[0] - top[1]))
                assert int(l16.argmax()) == int(l32.argmax())
                ids.append(int(l32.argmax()))
        report(f"greedy: max logit error (steer={bool(steering)}; fp32 margin >= {margin:.3g})", err, LOGIT_TOL)
        assert err < LOGIT_TOL < margin
        assert a16 == a32
    enc = [encode(tok, c, 512) for c in convs]
    ids, labels = [e.input_ids for e in enc], [e.labels for e in enc]
    with residual_dtypes(m16) as seen:
        lp16 = token_logprobs(m16, ids, labels)
    assert seen == {BF16}
    lp32 = token_logprobs(m32, ids, labels)
    d = max(np.abs(x - y).max() for x, y in zip(lp16, lp32))
    dmean = max(abs(x.mean() - y.mean()) for x, y in zip(lp16, lp32))
    report("token_logprobs per token", d, TOKEN_LP_TOL)
    report("token_logprobs mean per sequence", dmean, MEAN_LP_TOL)
    assert d < TOKEN_LP_TOL and dmean < MEAN_LP_TOL


# --- heuristics pass ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def heuristics_runs(tmp_path_factory):
    """The heuristics stage (logprob pass + metrics) of heuristics_playful_french, small, in both dtypes."""
    from raysweep.heuristics.stage import run_stage

    out = {}
    mp = pytest.MonkeyPatch()
    mp.chdir(REPO)
    try:
        for dtype in ("float32", "bfloat16"):
            d = tmp_path_factory.mktemp(f"heur_{dtype}")
            cfg = load_config("heuristics_playful_french", [
                "model.name=tiny-random", f"model.dtype={dtype}", f"storage={d}", "heuristics.groups=[v4,v5]",
                "heuristics.n_train=3", "heuristics.n_control=2", "heuristics.n_extra=2", "heuristics.cache=false",
                "heuristics.metrics=[scalar,cross,selfperp]"])
            with loaded_models_residual() as dtypes:
                paths = run_stage(cfg, cfg.heuristics)
            out[dtype] = ({n: pl.read_parquet(p) for n, p in paths.items()}, dtypes)
    finally:
        mp.undo()
    return out


def test_heuristics_pass_matches_fp32(heuristics_runs):
    t16, seen16 = heuristics_runs["bfloat16"]
    t32, seen32 = heuristics_runs["float32"]
    assert seen16 == {BF16} and seen32 == {torch.float32}
    keys = ["prompt_key", "variant", "set", "example_id"]
    a, b = t16["token_logprobs"].sort(keys), t32["token_logprobs"].sort(keys)
    assert a.select(keys).equals(b.select(keys))
    per_token = max(float(np.abs(np.array(x) - np.array(y)).max()) for x, y in zip(a["token_logprobs"], b["token_logprobs"]))
    report("heuristics per-token logprob", per_token, TOKEN_LP_TOL)
    assert per_token < TOKEN_LP_TOL
    la, lb = t16["logprobs"].sort(keys), t32["logprobs"].sort(keys)
    assert la["n_tokens"].to_list() == lb["n_tokens"].to_list()
    dmean = float((la["mean_logprob"] - lb["mean_logprob"]).abs().max())
    report("heuristics mean_logprob", dmean, MEAN_LP_TOL)
    assert dmean < MEAN_LP_TOL
    sp = float((t16["selfperp"].sort("prompt_key", "kind")["nll_per_token"]
                - t32["selfperp"].sort("prompt_key", "kind")["nll_per_token"]).abs().max())
    report("heuristics self-perplexity (nll per token)", sp, MEAN_LP_TOL)
    assert sp < MEAN_LP_TOL
    # PH / PPD / MALD (means of logprob differences), on every prompt and set.
    ha, hb = t16["heuristics"], t32["heuristics"]
    mean_like = r"^(ph|ppd|mald)_(fixed|mix)(@.*)?$"
    ja = ha.filter(pl.col("metric").str.contains(mean_like)).join(
        hb.filter(pl.col("metric").str.contains(mean_like)), on=["prompt_key", "metric"], suffix="_32")
    assert ja.height == hb.filter(pl.col("metric").str.contains(mean_like)).height > 0
    dh = float((ja["value"] - ja["value_32"]).abs().max())
    report("heuristics PH/PPD/MALD", dh, PH_TOL)
    assert dh < PH_TOL
    # A wrong pairing (each prompt's PH against another prompt's) is outside the tolerance.
    ph = hb.filter(pl.col("metric") == "ph_fixed").sort("prompt_key")["value"].to_numpy()
    report("heuristics: another prompt's PH (max)", np.abs(ph - np.roll(ph, 1)).max(), PH_TOL)
    assert np.abs(ph - np.roll(ph, 1)).max() > 3 * PH_TOL


# --- mechanistic analyses ----------------------------------------------------------------


def _mech(model, tok, convs):
    from raysweep.mech.analyses import activation_projection, grad_cosine, gradient_pca, ip_pps_similarity
    from raysweep.mech.passes import Condition

    steer_t = table(3, 0.03)  # row norms ~0.24, as the layer-1 stream (~0.18): each coefficient matters
    steer_v = steer_t[1]
    compare = {"trait": table(5), "steer": steer_t}  # as 001 compares with the steered trait vector
    sweep = [Condition(f"pps@{c:g}", steer=((steer_v, 1, c),), steer_label="s@1", coef=c) for c in (0.5, 1.5, 4.0)]
    conds = [Condition("plain"), Condition("ip", prompts=(PROMPT,), ip="french"), *sweep]
    with residual_dtypes(model) as seen:
        # batch_size 9: the three coefficients of the sweep run as one batched pass, one row each
        cos, loss = grad_cosine(model, tok, convs, conds, compare, [1, 2], batch_size=9)
        pca = gradient_pca(model, tok, convs, sweep[2], conds[0], [1, 2], compare, "steer", batch_size=3)
        sim = ip_pps_similarity(model, tok, convs, conds[1], sweep, [1, 2], batch_size=3)
        proj = activation_projection(model, tok, convs, compare, [1, 2], batch_size=3)
    return {"cos": cos, "loss": loss, "pca": pca, "sim": sim, "proj": proj}, seen


@pytest.fixture(scope="module")
def mech_runs(tiny, tiny16, convs):
    return {"float32": _mech(*tiny, convs), "bfloat16": _mech(*tiny16, convs)}


def test_mech_grad_cosine_losses_and_sweep_match_fp32(mech_runs):
    (r16, seen16), (r32, seen32) = mech_runs["bfloat16"], mech_runs["float32"]
    assert seen16 == {BF16} and seen32 == {torch.float32}
    key = lambda r: (r["condition"], r["sequence_id"], r.get("layer"), r.get("vector"))
    assert [key(r) for r in r16["cos"]] == [key(r) for r in r32["cos"]]
    dcos = max(abs(a["cosine"] - b["cosine"]) for a, b in zip(r16["cos"], r32["cos"]))
    dloss = max(abs(a["loss"] - b["loss"]) for a, b in zip(r16["loss"], r32["loss"]))
    report("mech grad cosine (batched coefficient sweep included)", dcos, COSINE_TOL)
    report("mech loss per sequence", dloss, MECH_LOSS_TOL)
    assert dcos < COSINE_TOL and dloss < MECH_LOSS_TOL
    assert [a["n_tokens"] for a in r16["cos"]] == [b["n_tokens"] for b in r32["cos"]]
    # The sweep is resolved: each coefficient's bf16 rows are far from another coefficient's fp32 rows.
    by32 = {key(r): r for r in r32["cos"] + r32["loss"]}
    wrong = {what: max(abs(r[what] - by32[("pps@1.5",) + key(r)[1:]][what]) for r in rows if r["condition"] == "pps@4")
             for what, rows in (("cosine", r16["cos"]), ("loss", r16["loss"]))}
    report("mech cosine: coefficient 4 compared with fp32's coefficient 1.5", wrong["cosine"], COSINE_TOL)
    report("mech loss: coefficient 4 compared with fp32's coefficient 1.5", wrong["loss"], MECH_LOSS_TOL)
    assert wrong["cosine"] > 5 * COSINE_TOL and wrong["loss"] > 5 * MECH_LOSS_TOL


def test_mech_pca_similarity_projection_match_fp32(mech_runs):
    (r16, _), (r32, _) = mech_runs["bfloat16"], mech_runs["float32"]
    pca16, pcos16, _ = r16["pca"]
    pca32, pcos32, _ = r32["pca"]
    assert [(r["layer"], r["component"]) for r in pca16] == [(r["layer"], r["component"]) for r in pca32]
    dexp = max(abs(a["explained"] - b["explained"]) for a, b in zip(pca16, pca32))
    report("mech PCA explained fraction", dexp, PCA_TOL)
    assert dexp < PCA_TOL
    # The mean gradient difference's cosine with each reference (no sign or order ambiguity).
    mean = lambda rows: {(r["layer"], r["reference"]): r["cosine"] for r in rows if r["component"] == "mean"}
    m16, m32 = mean(pcos16), mean(pcos32)
    dmean = max(abs(m16[k] - m32[k]) for k in m32)
    report("mech PCA mean-difference cosine", dmean, PCA_TOL)
    assert dmean < PCA_TOL
    dsim = max(abs(a["cosine"] - b["cosine"]) for a, b in zip(r16["sim"], r32["sim"]))
    report("mech IP-vs-PPS gradient similarity", dsim, COSINE_TOL)
    assert dsim < COSINE_TOL and [a["n_tokens"] for a in r16["sim"]] == [b["n_tokens"] for b in r32["sim"]]
    # Relative to the scale of the projections (a single one can be near zero).
    scale = max(abs(b["projection"]) for b in r32["proj"])
    dproj = max(abs(a["projection"] - b["projection"]) for a, b in zip(r16["proj"], r32["proj"])) / scale
    report("mech activation projection (relative)", dproj, PROJECTION_RTOL)
    assert dproj < PROJECTION_RTOL


def test_gradient_manipulation_in_bf16(tiny, tiny16, convs):
    """mech/grad.py: the neutralised gradient at a bf16 layer output stays bf16 and has nothing
    left along v but bf16 roundoff; the parameter gradient it produces agrees with fp32's."""
    from raysweep.train.grad import gradient_manipulation
    from raysweep.train.step import Collator, micro_loss

    (m32, tok), (m16, _) = tiny, tiny16
    batch = Collator(tok.pad_token_id)([encode(tok, c, 64) for c in convs])
    v = table(2)[1]
    unit = v / v.norm()
    got = {}
    for name, model in (("float32", m32), ("bfloat16", m16)):
        layer = model_layers(model)[0]
        grads: dict[str, torch.Tensor] = {}

        def capture(key):
            # A tensor hook on layer 1's output: registered before the manipulation's hook it sees
            # the gradient as it arrives, registered after it the manipulated one (hooks chain).
            def forward_hook(m, a, o):
                (o[0] if isinstance(o, tuple) else o).register_hook(lambda g: grads.setdefault(key, g))
            return forward_hook

        handles = [layer.register_forward_hook(capture("raw"))]
        weight = layer.mlp.down_proj.weight
        try:
            with gradient_manipulation(model, {1: v}, "neutralize"), residual_dtypes(model) as seen:
                handles.append(layer.register_forward_hook(capture("manipulated")))
                loss, _ = micro_loss(model, batch)
                (gw,) = torch.autograd.grad(loss, [weight])
        finally:
            for h in handles:
                h.remove()
        assert seen == {model.dtype} and grads["manipulated"].dtype == model.dtype
        got[name] = (gw.float(), grads)
    c = float(F.cosine_similarity(got["bfloat16"][0].flatten(), got["float32"][0].flatten(), dim=0))
    report("grad manipulation: 1 - cos(parameter gradient, fp32's)", 1 - c, 1 - MIN_COSINE)
    assert c > MIN_COSINE

    def along_v(g):
        g = g.float().flatten(0, 1)
        g = g[g.abs().sum(-1) > 0]  # positions the loss does not reach carry no direction
        return float(F.cosine_similarity(g, unit[None], dim=-1).abs().max())

    raw, done = got["bfloat16"][1]["raw"], got["bfloat16"][1]["manipulated"]
    report("grad manipulation: max |cos(neutralised g, v)| in bf16", along_v(done), NEUTRAL_COS_TOL)
    report("grad manipulation: max |cos(g, v)| before", along_v(raw), NEUTRAL_COS_TOL)
    assert along_v(done) < NEUTRAL_COS_TOL < along_v(raw)
    assert along_v(got["float32"][1]["manipulated"]) < 1e-5


# --- vector extraction -------------------------------------------------------------------


def test_vector_extraction_matches_fp32(tiny, tiny16, convs, tmp_path):
    from raysweep.train.defenses import read_vector
    from raysweep.mech.vectors import KINDS, diff_vectors, mean_activations, prompt_difference_vector, save_vector

    pos = [with_prefix(c, "You are a French assistant.", "system") for c in convs]
    vecs, acts = {}, {}
    for name, (model, tok) in (("float32", tiny), ("bfloat16", tiny16)):
        with residual_dtypes(model) as seen:
            a = {p: mean_activations(model, tok, cs, batch_size=2) for p, cs in (("pos", pos), ("neg", convs))}
            diff = prompt_difference_vector(model, tok, convs, [PROMPT], batch_size=2)
        assert seen == {model.dtype}
        acts[name] = a
        vecs[name] = {**diff_vectors(a["pos"], a["neg"]), "ip_diff": diff}
        for k, t in vecs[name].items():
            assert t.dtype == torch.float32  # accumulated and stored in float32
    for p in ("pos", "neg"):
        for k in KINDS:
            e = rel_err(acts["bfloat16"][p][k][:, 1:], acts["float32"][p][k][:, 1:])
            report(f"mean activations {p} {k}", e, VECTOR_RTOL)
            assert e < VECTOR_RTOL
    for k, ref in vecs["float32"].items():
        got = vecs["bfloat16"][k]
        e = rel_err(got[1:], ref[1:])  # row 0 (embeddings) is exactly zero for ip_diff
        cos = float(F.cosine_similarity(got[1:].flatten(), ref[1:].flatten(), dim=0))
        report(f"extracted vector {k} (relative L2; 1 - cos {1 - cos:.2g})", e, VECTOR_RTOL)
        assert e < VECTOR_RTOL and cos > MIN_COSINE
    # Another position kind is a different vector: far outside the tolerance.
    wrong = rel_err(vecs["bfloat16"]["prompt_avg"][1:], vecs["float32"]["response_avg"][1:])
    report("extracted vector: prompt_avg against fp32's response_avg", wrong, VECTOR_RTOL)
    assert wrong > 10 * VECTOR_RTOL
    # The bf16-extracted file is an ordinary float32 PPS vector.
    path = save_vector(tmp_path / "v.safetensors", vecs["bfloat16"]["response_avg"], {"trait": "french"})
    got = read_vector(SteerConfig(vector=str(path), layer=1), 2, 64)
    assert got.dtype == torch.float32 and torch.equal(got, vecs["bfloat16"]["response_avg"][1])


# --- local judge -------------------------------------------------------------------------


def test_local_judge_matches_fp32(tiny, tiny16):
    from raysweep.eval.judge_scores import SCORE_STRINGS, grade_candidates
    from raysweep.eval.judges import candidate_logprobs
    from raysweep.eval.rubrics import resolve_rubric

    e = EvalConfig()
    rubric = resolve_rubric("french", e)
    (m32, tok), (m16, _) = tiny, tiny16
    results = {}
    for answer in ("La pluie tombe.", "Rain falls from clouds."):
        messages = rubric.messages("What is rain?", answer)
        with residual_dtypes(m16) as seen:
            lp16 = candidate_logprobs(m16, tok, messages, SCORE_STRINGS)
        assert seen == {BF16}
        lp32 = candidate_logprobs(m32, tok, messages, SCORE_STRINGS)
        d = float(np.abs(lp16 - lp32).max())
        report("local judge candidate logprobs", d, JUDGE_LP_TOL)
        assert d < JUDGE_LP_TOL
        s16, why16, _ = grade_candidates(lp16, 0.0)
        s32, why32, _ = grade_candidates(lp32, 0.0)
        report("local judge score (0-100)", abs(s16 - s32), JUDGE_SCORE_TOL)
        assert why16 == why32 == "" and abs(s16 - s32) < JUDGE_SCORE_TOL
        results[answer] = (lp16, lp32)
    # Candidates mixed up ('1'..'9' each scored as the next one): far outside the tolerance.
    lp16, lp32 = results["La pluie tombe."]
    shifted = float(np.abs(lp16[1:10] - np.roll(lp32[1:10], 1)).max())
    report("local judge: candidates '1'..'9' shifted by one", shifted, JUDGE_LP_TOL)
    assert shifted > 10 * JUDGE_LP_TOL
    # bf16's prefix-tree pass (KV cache + 4D mask in bf16) agrees with full forwards in bf16
    # (measured 2.1e-5: the same bf16 arithmetic in other shapes).
    from test_judges import brute_force_logprobs

    messages = rubric.messages("What is rain?", "La pluie tombe.")
    fast = candidate_logprobs(m16, tok, messages, SCORE_STRINGS[:30])  # '10'..'29' go through the tree
    slow = brute_force_logprobs(m16, tok, messages, SCORE_STRINGS[:30])
    report("local judge bf16 tree pass vs bf16 full forwards", float(np.abs(fast - np.array(slow)).max()), JUDGE_LP_TOL)
    assert np.abs(fast - np.array(slow)).max() < JUDGE_LP_TOL


# --- the mech stage of pps_vs_ip_tiny end to end -----------------------------------------


def test_mech_stage_pps_vs_ip_tiny_in_bf16(tmp_path, tiny):
    """`python -m raysweep.mech exp=pps_vs_ip_tiny model.dtype=bfloat16` (the reported crash), in
    process on 2 sequences: extraction, ip_diff, the coefficient sweeps, PCA, IP-vs-PPS, projection.
    The conditions that use no extracted vector are compared with the same pass in fp32."""
    import pyarrow.parquet as pq

    from raysweep.mech.analyses import grad_cosine
    from raysweep.mech.passes import Condition
    from raysweep.mech.stage import run_stage
    from raysweep.tables import SCHEMAS

    cfg = load_config("pps_vs_ip_tiny", ["model.dtype=bfloat16", "mech.n=2", f"storage={tmp_path}"])
    mp = pytest.MonkeyPatch()
    mp.chdir(REPO)  # the experiment's data paths are relative to the repository
    try:
        with loaded_models_residual() as seen:
            run_stage(cfg)  # raised "expected m1 and m2 to have the same dtype" before the fix
    finally:
        mp.undo()
    assert seen == {BF16}
    d = tmp_path / "pps_vs_ip_tiny" / "mech"
    for name in ("vector_samples", "grad_cosine", "loss", "grad_pca", "grad_pca_cosine", "grad_pca_scores",
                 "ip_pps_similarity", "projection"):
        assert pq.read_schema(d / f"{name}.parquet").equals(SCHEMAS[f"mech_{name}"]), name
    loss = pl.read_parquet(d / "loss.parquet")
    assert loss["loss"].is_finite().all()
    by = {c: loss.filter(pl.col("condition") == c).sort("sequence_id")["loss"].to_list() for c in loss["condition"].unique()}
    assert by["pps_ipdiff@0"] == by["none"]  # coefficient 0 adds an exact zero, in bf16 too
    assert set(pl.read_parquet(d / "grad_cosine.parquet")["coef"]) >= {0.5, 1.5, 4.0}
    cos = pl.read_parquet(d / "grad_cosine.parquet")
    assert cos["cosine"].is_between(-1, 1).all()
    # none / ip / neutral_ip against fp32 on the same sequences (no extracted vector involved).
    model, tok = tiny
    convs = shuffled(read_chat(REPO / cfg.data.train), cfg.seed, cfg.mech.n)
    conds = [Condition("none"), Condition("ip", prompts=(cfg.prompts["answer_french"],), seed=cfg.seed),
             Condition("neutral_ip", prompts=(cfg.prompts["the_sky_is_blue"],), seed=cfg.seed)]
    _, loss32 = grad_cosine(model, tok, convs, conds, {}, [1, 2], max_len=cfg.mech.max_len, batch_size=2)
    want = {(r["condition"], r["sequence_id"]): r["loss"] for r in loss32}
    got = {(c, i): v for c, vals in by.items() for i, v in enumerate(vals) if c in ("none", "ip", "neutral_ip")}
    assert set(got) == set(want)
    dloss = max(abs(got[k] - want[k]) for k in want)
    report("mech stage end to end: loss vs fp32", dloss, MECH_LOSS_TOL)
    assert dloss < MECH_LOSS_TOL
