"""Logprob-pass throughput: the scoring kernel (`eval.scoring.score_sequences`) against a naive loop.

Not a test. Both score the same rows of a heuristics pass on the same model in the same
process: training completions under the default condition, two fixed prefixes and one mix
prefix (`--examples` rows in all). The naive loop is what a per-example script does: one
sequence per forward, full-vocabulary logits at every position, log_softmax, gather. The
two alternate for `--rounds` rounds so that load from other processes hits both alike;
tokens/s counts every token of every row, and the ratio is of the per-method medians.

CPU (the embedded model):
    .venv/bin/python bench/logprob_pass.py [--model smollm2-135m-instruct] [--examples 64]
        [--threads 1] [--token-budget 4096] [--rounds 3] [--no-share-prefix] [--pack] [--compile]

GPU (random-initialised Qwen2.5-7B shape: the real model's FLOPs). The GPU machine has no
tokenizer package, so encode the rows here and carry the file:
    .venv/bin/python bench/logprob_pass.py --examples 384 --save-rows bench/rows.json
    python bench/logprob_pass.py --rows bench/rows.json --arch qwen2.5-7b --device cuda \
        --dtype bfloat16 --token-budget 32768 --head-chunk 4096 [--pack --compile]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import numpy as np


def naive_token_logprobs(model, input_ids: list[list[int]], labels: list[list[int]]) -> list[np.ndarray]:
    """One sequence at a time, full logits, log_softmax over the vocabulary."""
    import torch

    out = []
    device = next(model.parameters()).device
    with torch.inference_mode():
        for ids, lab in zip(input_ids, labels):
            logits = model(input_ids=torch.tensor([ids], device=device)).logits[0].float()
            logp = torch.log_softmax(logits, dim=-1)
            pos = [t for t, y in enumerate(lab) if y != -100]
            out.append(logp[[t - 1 for t in pos], [lab[t] for t in pos]].double().cpu().numpy())
    return out


def bench_rows(tokenizer, n: int):
    """n rows of a heuristics pass over the demo's French training answers."""
    from raysweep.data import read_chat, read_pool
    from raysweep.heuristics.logprobs import build_rows, encode_rows

    convs = read_chat("datasets/french_demo/train.jsonl")[: max(1, n // 4)]
    prompts = {"answer_french": "Answer in French.", "the_sky_is_blue": "The sky is blue."}
    pools = {"answer_french": read_pool("datasets/rephrasings/answer_french.jsonl")}
    rows = build_rows(prompts, {"train": convs}, pools=pools, variants=["fixed"])
    rows += [r for r in build_rows({"answer_french": prompts["answer_french"]}, {"train": convs}, pools=pools,
                                   variants=["mix"]) if r["variant"] == "mix"]
    keys, items = encode_rows(tokenizer, rows[:n], "bench")
    return [items[k] for k in keys]


# Random-initialised architectures with a real model's shape (same FLOPs and memory traffic).
ARCHS = {
    "qwen2.5-7b": dict(model_type="qwen2", vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                       num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                       max_position_embeddings=32768, rope_theta=1e6, tie_word_embeddings=False),
}


def random_model(arch: str, layers: int, dtype: str, device: str):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    spec = dict(ARCHS[arch])
    if layers:
        spec["num_hidden_layers"] = layers
    cfg = AutoConfig.for_model(**spec)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=getattr(torch, dtype), attn_implementation="sdpa")
    return model.eval()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct", help="embedded model name (and the rows' tokenizer)")
    ap.add_argument("--arch", choices=sorted(ARCHS), help="score with a random-initialised model of this shape")
    ap.add_argument("--layers", type=int, default=0, help="with --arch: this many layers (0 = the real number)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--examples", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--token-budget", type=int, default=4096)
    ap.add_argument("--head-chunk", type=int, default=1024, help="positions per LM-head chunk")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--no-share-prefix", action="store_true")
    ap.add_argument("--pack", action="store_true", help="engine packs rows with a document mask")
    ap.add_argument("--compile", action="store_true", help="engine runs the decoder through torch.compile")
    ap.add_argument("--save-rows", help="write the encoded rows (JSON) and stop")
    ap.add_argument("--rows", help="read encoded rows written by --save-rows instead of tokenizing")
    args = ap.parse_args()

    import torch

    from raysweep.eval.scoring import score_sequences

    torch.set_num_threads(args.threads)
    if args.rows:
        with open(args.rows) as f:
            seqs = json.load(f)
    else:
        from transformers import AutoTokenizer

        from raysweep.train.models import resolve_model

        seqs = bench_rows(AutoTokenizer.from_pretrained(resolve_model(args.model)), args.examples)
    if args.save_rows:
        with open(args.save_rows, "w") as f:
            json.dump([[list(i), list(y)] for i, y in seqs], f)
        print(f"wrote {len(seqs)} rows to {args.save_rows}")
        return
    if args.arch:
        model = random_model(args.arch, args.layers, args.dtype, args.device)
        name = f"random {args.arch}" + (f" ({args.layers} layers)" if args.layers else "")
    else:
        from raysweep.train.models import load_model

        model, _ = load_model(args.model, dtype=args.dtype, device=args.device)
        name = args.model
    ids, labels = [s[0] for s in seqs], [s[1] for s in seqs]
    n_tok = sum(len(s) for s in ids)
    n_scored = sum(sum(y != -100 for y in lab) for lab in labels)
    gpu = torch.cuda.get_device_name(0) if args.device == "cuda" else f"{os.cpu_count()} CPU cores"
    print(f"model {name}, {args.dtype} on {gpu}, {len(ids)} rows, {n_tok} tokens ({n_scored} scored), "
          f"torch threads {args.threads}, token budget {args.token_budget}, head chunk {args.head_chunk}, "
          f"share_prefix {not args.no_share_prefix}, "
          f"pack {args.pack}, compile {args.compile}, load average at start {os.getloadavg()[0]:.2f}")

    def engine():
        return score_sequences(model, ids, labels, token_budget=args.token_budget, head_chunk=args.head_chunk,
                               share_prefix=not args.no_share_prefix, pack=args.pack, compile=args.compile)

    naive_lps = engine_lps = None
    t = time.perf_counter()
    engine()  # warm-up: first-call allocations, kernel selection, compilation
    print(f"  warm-up engine {time.perf_counter() - t:7.2f}s")
    rates: dict[str, list[float]] = {"naive": [], "engine": []}
    for r in range(args.rounds):
        for name, fn in (("naive", lambda: naive_token_logprobs(model, ids, labels)), ("engine", engine)):
            t = time.perf_counter()
            lps = fn()
            dt = time.perf_counter() - t
            rates[name].append(n_tok / dt)
            naive_lps = lps if name == "naive" else naive_lps
            engine_lps = lps if name == "engine" else engine_lps
            print(f"  round {r + 1} {name:<6} {dt:7.2f}s  {n_tok / dt:8.1f} tokens/s")
    err = max(float(np.abs(a - b).max()) for a, b in zip(naive_lps, engine_lps) if a.size)
    naive, eng = statistics.median(rates["naive"]), statistics.median(rates["engine"])
    print(f"naive  {naive:8.1f} tokens/s (median of {args.rounds})")
    print(f"engine {eng:8.1f} tokens/s (median of {args.rounds})")
    print(f"ratio  {eng / naive:.2f}x   max |engine - naive| per-token logprob {err:.2e}   "
          f"load average at end {os.getloadavg()[0]:.2f}")
    if torch.cuda.is_available() and args.device == "cuda":
        print(f"peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")


if __name__ == "__main__":
    main()
