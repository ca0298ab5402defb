"""Logprob-pass throughput: the engine (`heuristics.logprobs.score_sequences`) against a naive loop.

Not a test. Both score the same rows of a heuristics pass on the same model in the same
process: training completions under the default condition, two fixed prefixes and one mix
prefix (`--examples` rows in all). The naive loop is what a per-example script does: one
sequence per forward, full-vocabulary logits at every position, log_softmax, gather. The
two alternate for `--rounds` rounds so that load from other processes hits both alike;
tokens/s counts every token of every row, and the ratio is of the per-method medians.

    .venv/bin/python bench/logprob_pass.py [--model smollm2-135m-instruct] [--examples 64]
        [--threads 1] [--token-budget 4096] [--rounds 3] [--no-share-prefix]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np


def naive_token_logprobs(model, input_ids: list[list[int]], labels: list[list[int]]) -> list[np.ndarray]:
    """One sequence at a time, full logits, log_softmax over the vocabulary."""
    import torch

    out = []
    with torch.inference_mode():
        for ids, lab in zip(input_ids, labels):
            logits = model(input_ids=torch.tensor([ids])).logits[0].float()
            logp = torch.log_softmax(logits, dim=-1)
            pos = [t for t, y in enumerate(lab) if y != -100]
            out.append(logp[[t - 1 for t in pos], [lab[t] for t in pos]].double().numpy())
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--examples", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--token-budget", type=int, default=4096)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--no-share-prefix", action="store_true")
    args = ap.parse_args()

    import torch

    from raysweep.heuristics.logprobs import score_sequences
    from raysweep.models import load_model

    torch.set_num_threads(args.threads)
    model, tokenizer = load_model(args.model)
    seqs = bench_rows(tokenizer, args.examples)
    ids, labels = [s[0] for s in seqs], [s[1] for s in seqs]
    n_tok = sum(len(s) for s in ids)
    n_scored = sum(sum(y != -100 for y in lab) for lab in labels)
    print(f"model {args.model}, {len(ids)} rows, {n_tok} tokens ({n_scored} scored), torch threads {args.threads}, "
          f"token budget {args.token_budget}, share_prefix {not args.no_share_prefix}, "
          f"load average at start {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores")

    def engine():
        return score_sequences(model, ids, labels, token_budget=args.token_budget,
                               share_prefix=not args.no_share_prefix)

    naive_lps = engine_lps = None
    engine()  # warm-up: first-call allocations and kernel selection
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


if __name__ == "__main__":
    main()
