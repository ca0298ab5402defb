"""GPU suite: every GPU figure of PERFORMANCE.md, measured on the project's own code in one run.

On the device machine, from the repo root (torch, transformers and peft are all it needs; no
install, no tokenizer, no network; the section budgets cap it at ~7.5 minutes plus start-up):

    PYTHONUNBUFFERED=1 python bench/gpu_suite.py

It prints one table and appends it, with the device name and the torch / transformers / peft /
CUDA versions, to bench/NOTES.md as a new dated section (`--notes PATH` elsewhere, `--notes -`
nowhere). `--only logprob,lora` runs some sections; `--budget lora=200` changes a section's time
budget (seconds; a section past it stops, its finished rows kept). A failing section prints its
error in its row and the rest still run. Same code paths on CPU, 1-layer shrunken model, 1 torch
thread, ~15-30 s; torch.compile there uses the aot_eager backend (dynamo and AOT autograd trace as
on GPU; inductor's C++ builds would take minutes), and no notes are written unless `--notes PATH`:

    .venv/bin/python bench/gpu_suite.py --cpu-smoke [--notes PATH] [--compile-backend inductor]

Model: random-initialised Qwen2.5-7B shape (bench/logprob_pass.py's ARCHS: 28 layers, hidden 3584,
28/4 heads, MLP 18944, vocab 152064), built on the device in bf16 once per section and freed
after it. Sequences are seeded random token ids shaped like chat rows: a shared 24-token system
block, a 20-150-token user turn, a 60-350-token answer (labelled), 104-522 tokens in all.
tokens/s counts every token of every sequence (generation: new tokens); "ratio" is against the
section's baseline row in the same run; "vs anchor" against PERFORMANCE.md's H100 figure; peak
GiB is torch.cuda.max_memory_allocated over the timed rounds (reset before each row).

Rows:
  logprob  naive loop          one sequence per forward, full-vocabulary logits, log_softmax
                               (logprob_pass.naive_token_logprobs): the baseline
  logprob  engine buckets      eval.scoring.score_sequences (the scoring kernel): length-bucketed 32k-token
                               batches, shared prefix once, LM head on scored positions in 4k chunks
  logprob  packed + flex       the same with pack=True: 16k-token rows, flex-attention document
                               BlockMask on CUDA (a dense mask on CPU, as the kernel does)
  logprob  packed+flex+compile pack=True, compile=True (the decoder through torch.compile)
  lora     eager               train.train_step: LoRA r64/alpha128 on all linear layers (train.add_lora
                               with TrainConfig's defaults), AdamW (make_optimizer), batch 4 x 512
  lora     torch.compile       the same step on torch.compile(model); ratio vs eager
  generate HF generate         batch 64, 64-token prompts, 128 new tokens, sampling with the eval's
                               GenerationConfig (generation._generation_config); baseline for the
                               eval engine
  grads    mech run_pass       mech.passes.run_pass: dL/dh at the output of every layer (frozen
                               weights, batch 8 x 300 tokens) + token_cosines with a vector per layer
"""

from __future__ import annotations

import argparse
import datetime
import gc
import os
import signal
import statistics
import sys
import time
import traceback
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]  # `import raysweep` without installing the project

from logprob_pass import ARCHS, naive_token_logprobs, random_model  # noqa: E402

ARCH, SMOKE_ARCH = "qwen2.5-7b", "qwen2.5-7b-smoke"
# The smoke model: Qwen2 code paths, one layer, small widths (head_dim 64 like the real 128: a power of 2).
ARCHS[SMOKE_ARCH] = {**ARCHS[ARCH], "num_hidden_layers": 1, "hidden_size": 256, "intermediate_size": 512,
                     "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 8192}

# PERFORMANCE.md, H100 80GB: tokens/s (a (low, high) pair where it gives a range).
ANCHORS = {"naive": 7.1e3, "engine": 27.0e3, "packed": 30.9e3, "compiled": 36.7e3, "lora_eager": 7.5e3,
           "lora_compiled": 10.4e3, "generate": (0.9e3, 1.6e3), "grads": 14.2e3}
TARGETS = {"compiled": 40e3, "lora_compiled": 12e3}  # PERFORMANCE.md's targets for the project's engine

# Workload per mode. GPU: the shapes PERFORMANCE.md measured; smoke: the same paths, small.
GPU = dict(arch=ARCH, rows=256, budget=32768, head_chunk=4096, pack_row=16384, rounds=2, lora_batch=(4, 512),
           lora_steps=5, gen=(64, 64, 128), grad_seqs=(64, 300), grad_batch=8)
SMOKE = dict(arch=SMOKE_ARCH, rows=8, budget=2048, head_chunk=512, pack_row=1024, rounds=1, lora_batch=(2, 128),
             lora_steps=1, gen=(16, 32, 16), grad_seqs=(8, 200), grad_batch=4)
BUDGETS = {"logprob": 210, "lora": 150, "generate": 45, "grads": 45}  # seconds per section (GPU): 7.5 min at most
SMOKE_BUDGETS = {"logprob": 60, "lora": 60, "generate": 20, "grads": 20}
SECTIONS = tuple(BUDGETS)
T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:6.1f}s] {msg}", flush=True)


class SectionTimeout(Exception):
    pass


def chat_rows(n: int, vocab: int, seed: int, shared: int = 24) -> list[tuple[list[int], list[int]]]:
    """n (input_ids, labels) rows shaped like rendered chats: shared system block, user turn, labelled answer."""
    rng = np.random.default_rng(seed)
    system = rng.integers(1, vocab, shared).tolist()
    rows = []
    for _ in range(n):
        prompt = system + rng.integers(1, vocab, rng.integers(20, 150)).tolist()
        answer = rng.integers(1, vocab, rng.integers(60, 350)).tolist()
        rows.append((prompt + answer, [-100] * len(prompt) + answer))
    return rows


class Run:
    """Device, dtype, workload and the table's rows."""

    def __init__(self, args):
        import torch

        self.smoke, self.w = args.cpu_smoke, SMOKE if args.cpu_smoke else GPU
        self.device = "cpu" if self.smoke else "cuda"
        self.dtype, self.backend = "bfloat16", args.compile_backend or ("aot_eager" if self.smoke else "inductor")
        if self.smoke:
            torch.set_num_threads(args.threads)
            try:  # bf16 wherever this CPU's torch runs it; float32 otherwise
                torch.ones(2, 2, dtype=torch.bfloat16) @ torch.ones(2, 2, dtype=torch.bfloat16)
            except RuntimeError:
                self.dtype = "float32"
        self.rows: list[dict] = []
        self.baseline: dict[str, float] = {}

    def model(self):
        t = time.perf_counter()
        model = random_model(self.w["arch"], 0, self.dtype, self.device)
        log(f"  built {self.w['arch']} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params, "
            f"{self.dtype}) in {time.perf_counter() - t:.1f}s")
        return model

    def sync(self):
        import torch

        if self.device == "cuda":
            torch.cuda.synchronize()

    def measure(self, fn, n_tokens: int, rounds: int, warmup=None):
        """(tokens/s of the median round, warm-up seconds, peak GiB of the timed rounds, last output)."""
        import torch

        t = time.perf_counter()
        (warmup or fn)()
        self.sync()
        warm = time.perf_counter() - t
        if self.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        times, out = [], None
        for _ in range(rounds):
            t = time.perf_counter()
            out = fn()
            self.sync()
            times.append(time.perf_counter() - t)
        peak = torch.cuda.max_memory_allocated() / 2**30 if self.device == "cuda" else None
        return n_tokens / statistics.median(times), warm, peak, out

    def add(self, section: str, name: str, tok_s=None, *, base: str | None = None, anchor: str | None = None,
            peak=None, note: str = "", error: str = "") -> None:
        """Record a row; `base`: the key of this run's baseline row; `anchor`: a key of ANCHORS."""
        ratio = f"{tok_s / self.baseline[base]:.2f}x" if tok_s and base in self.baseline else ""
        vs = ""
        if tok_s and anchor and not self.smoke:  # the H100 anchors say nothing about a CPU
            lo, hi = a if isinstance(a := ANCHORS[anchor], tuple) else (a, a)
            label = f"{lo / 1e3:.1f}-{hi / 1e3:.1f}k" if lo != hi else f"{lo / 1e3:.1f}k"
            vs = f"{tok_s / hi:.2f}x of {label}" if lo == hi else f"{tok_s / hi:.2f}-{tok_s / lo:.2f}x of {label}"
            if anchor in TARGETS:
                vs += f"; {tok_s / TARGETS[anchor]:.2f}x of target {TARGETS[anchor] / 1e3:.0f}k"
        row = dict(section=section, name=name, tok_s=f"{tok_s:.1f}" if tok_s else "-", ratio=ratio, anchor=vs,
                   peak=f"{peak:.1f}" if peak is not None else "-", note=(error or note).replace("|", "/"))
        self.rows.append(row)
        log(f"  {section} {name}: {row['tok_s']} tokens/s {ratio} {vs} {row['note']}")

    def table(self) -> str:
        head = ["section", "measure", "tokens/s", "ratio (same run)", "vs H100 anchor", "peak GiB", "note"]
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines += ["| " + " | ".join(r[k] for k in ("section", "name", "tok_s", "ratio", "anchor", "peak", "note"))
                  .replace("\n", " ") + " |" for r in self.rows]
        return "\n".join(lines)


def max_err(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    return max(float(np.abs(x - y).max()) for x, y in zip(a, b) if x.size)


def sec_logprob(run: Run) -> None:
    from raysweep.eval.scoring import score_sequences

    w = run.w
    model = run.model()
    seqs = chat_rows(w["rows"], model.config.vocab_size, seed=0)
    ids, labels = [s[0] for s in seqs], [s[1] for s in seqs]
    n = sum(map(len, ids))
    log(f"  {len(ids)} rows, {n} tokens ({sum(y != -100 for lab in labels for y in lab)} scored)")
    tok_s, warm, peak, ref = run.measure(lambda: naive_token_logprobs(model, ids, labels), n, 1,
                                         warmup=lambda: naive_token_logprobs(model, ids[:4], labels[:4]))
    run.baseline["naive"] = tok_s
    run.add("logprob", "naive loop (bs 1, full logits)", tok_s, anchor="naive", peak=peak)
    variants = [("engine", f"engine buckets ({w['budget'] // 1024}k, head chunk {w['head_chunk']})",
                 dict(token_budget=w["budget"])),
                ("packed", f"packed {w['pack_row'] // 1024}k rows + flex", dict(token_budget=w["pack_row"], pack=True)),
                ("compiled", "packed + flex + compile", dict(token_budget=w["pack_row"], pack=True, compile=True))]
    for key, name, kw in variants:
        def engine(kw=kw):
            return score_sequences(model, ids, labels, head_chunk=w["head_chunk"], **kw)

        tok_s, warm, peak, out = run.measure(engine, n, w["rounds"])
        mask = "" if run.device == "cuda" or not kw.get("pack") else "dense mask on CPU; "
        run.add("logprob", name, tok_s, base="naive", anchor=key, peak=peak,
                note=f"{mask}warm-up {warm:.1f}s; max abs diff vs naive {max_err(out, ref):.1e}")


def sec_lora(run: Run) -> None:
    import torch

    from raysweep.config import TrainConfig
    from raysweep.data import Encoded
    from raysweep.train.step import Collator, add_lora, make_optimizer, train_step

    cfg = TrainConfig()  # r64, alpha 128, all 7 linear projections: what a trial trains
    model = add_lora(run.model().train(), cfg, seed=0)
    opt, sched = make_optimizer(model, cfg, total=1000)
    b, length = run.w["lora_batch"]
    rng = np.random.default_rng(1)
    items = [Encoded(ids, [-100] + ids[1:]) for ids in rng.integers(1, model.config.vocab_size, (b, length)).tolist()]
    batch = {k: v.to(run.device) for k, v in Collator(pad_id=0)(items).items()}
    desc = f"r{cfg.lora.r}/a{cfg.lora.alpha}, {len(cfg.lora.target_modules)} linear targets, {b}x{length}"

    def step(fwd):
        return lambda: train_step(fwd, opt, sched, [batch], cfg.max_grad_norm)

    for key, name in (("lora_eager", "eager"), ("lora_compiled", "torch.compile")):
        tok_s, warm, peak, out = run.measure(step(model if key == "lora_eager" else torch.compile(model)),
                                             b * length, run.w["lora_steps"])
        run.baseline.setdefault("lora_eager", tok_s)
        run.add("lora", f"{name} step ({desc})", tok_s, base="lora_eager", anchor=key, peak=peak,
                note=f"warm-up {warm:.1f}s; loss {out['loss']:.2f}")


def sec_generate(run: Run) -> None:
    import torch

    from raysweep.eval.generation import _generation_config

    model = run.model()
    bs, plen, new = run.w["gen"]
    prompts = torch.randint(1, model.config.vocab_size, (bs, plen), generator=torch.Generator().manual_seed(2))
    prompts = prompts.to(run.device)
    cfg = _generation_config(new, temperature=1.0, top_p=1.0, stop=[0], pad_id=0)  # what the eval samples with
    torch.manual_seed(0)

    def gen(n_new=new):
        # min_length: a random model may draw the stop token; every row generates n_new tokens
        cfg.max_new_tokens, cfg.min_length = n_new, plen + n_new
        with torch.inference_mode():
            out = model.generate(input_ids=prompts, attention_mask=torch.ones_like(prompts), generation_config=cfg)
        assert out.shape[1] == plen + n_new, out.shape
        return out

    tok_s, warm, peak, _ = run.measure(gen, bs * new, 1, warmup=lambda: gen(8))
    run.add("generate", f"HF generate (batch {bs}, {plen}-token prompts, {new} new)", tok_s, anchor="generate",
            peak=peak, note="new tokens/s; baseline for the eval engine")


def sec_grads(run: Run) -> None:
    import torch

    from raysweep.data import Encoded
    from raysweep.mech.passes import Condition, run_pass, token_cosines

    model = run.model().requires_grad_(False)
    n_seq, length = run.w["grad_seqs"]
    layers = list(range(1, model.config.num_hidden_layers + 1))
    rng = np.random.default_rng(3)
    rows = rng.integers(1, model.config.vocab_size, (n_seq, length)).tolist()
    encoded = [Encoded(ids, [-100] * (length // 3) + ids[length // 3:]) for ids in rows]  # the answer: last 2/3
    vector = torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(4))

    class PadOnly:  # run_pass needs only the pad id from a tokenizer
        pad_token_id = 0

    def capture():
        cos = []
        for rec in run_pass(model, PadOnly, encoded, Condition("plain"), layers, batch_size=run.w["grad_batch"]):
            pos = rec.positions("response")
            cos.append([float(token_cosines(rec.grads[l], vector, pos).mean()) for l in layers])
        return np.asarray(cos)

    tok_s, warm, peak, cos = run.measure(capture, n_seq * length, run.w["rounds"],
                                         warmup=lambda: list(run_pass(model, PadOnly, encoded[:2], Condition("plain"),
                                                                      layers, batch_size=2)))
    assert cos.shape == (n_seq, len(layers)) and np.isfinite(cos).all(), cos.shape
    run.add("grads", f"mech run_pass dL/dh x {len(layers)} layers + cosine ({run.w['grad_batch']}x{length})", tok_s,
            anchor="grads", peak=peak, note="frozen weights; gradients copied to CPU per record, as the stage does")


def free_memory() -> None:
    import torch

    torch._dynamo.reset()  # compiled graphs hold the section's model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def run_section(run: Run, name: str, budget: float) -> bool:
    """Run one section within `budget` seconds; on failure, an error row. Returns whether it succeeded."""
    def alarm(signum, frame):
        raise SectionTimeout(f"over its {budget:.0f}s budget")

    log(f"{name}: start (budget {budget:.0f}s)")
    t = time.perf_counter()
    old = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, budget)
    try:
        globals()[f"sec_{name}"](run)
        ok = True
    except BaseException as e:  # noqa: BLE001 - one section's failure must not stop the others
        if isinstance(e, KeyboardInterrupt):
            raise
        log(traceback.format_exc()[-4000:])
        done = [r["name"] for r in run.rows if r["section"] == name]
        run.add(name, "ERROR", error=f"{type(e).__name__}: {str(e)[:200]} (after: {done[-1] if done else 'nothing'})")
        ok = False
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    free_memory()
    log(f"{name}: done in {time.perf_counter() - t:.1f}s")
    return ok


def versions(run: Run) -> str:
    import peft
    import torch
    import transformers

    where = (torch.cuda.get_device_name(0) if run.device == "cuda" else
             f"CPU ({os.cpu_count()} cores, {torch.backends.cpu.get_cpu_capability()}, "
             f"{torch.get_num_threads()} threads)")
    return (f"{where}; torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}, "
            f"CUDA {torch.version.cuda or 'none'}; torch.compile backend {run.backend}")


def append_notes(path: Path, run: Run, command: str, machine: str, wall: float) -> None:
    w = run.w
    title = "CPU smoke of the GPU suite" if run.smoke else "GPU suite: every PERFORMANCE.md figure in one run"
    text = (f"\n## {title} (`bench/gpu_suite.py`, {datetime.date.today().isoformat()})\n\n"
            f"Machine: {machine}. Command: `{command}` ({wall:.0f} s wall). Model: random-init "
            f"{w['arch']} ({'1 layer, shrunken' if run.smoke else 'real shape'}), {run.dtype}. Logprob rows: "
            f"{w['rows']} chat-shaped random rows (104-522 tokens); tokens/s counts every token; ratio = against "
            f"the section's baseline in the same run; anchor = PERFORMANCE.md (H100).\n\n{run.table()}\n")
    with open(path, "a") as f:
        f.write(text)
    log(f"appended the table to {path}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu-smoke", action="store_true", help="same code paths, 1-layer small model, CPU")
    ap.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated sections of {','.join(SECTIONS)}")
    ap.add_argument("--budget", action="append", default=[], metavar="SECTION=SECONDS", help="a section's time budget")
    ap.add_argument("--notes", help="append the table here (default: bench/NOTES.md on GPU, "
                    "nowhere with --cpu-smoke; '-': nowhere)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads with --cpu-smoke (2 stall on a busy box)")
    ap.add_argument("--compile-backend", help="torch.compile backend for every compile (default: inductor; "
                    "aot_eager with --cpu-smoke, where inductor's C++ builds take minutes on 2 cores)")
    args = ap.parse_args()
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    if bad := [s for s in [*only, *(b.partition("=")[0] for b in args.budget)] if s not in SECTIONS]:
        ap.error(f"unknown section(s) {bad}; sections: {', '.join(SECTIONS)}")
    budgets = dict(SMOKE_BUDGETS if args.cpu_smoke else BUDGETS)
    budgets.update((key, float(sec)) for key, _, sec in (b.partition("=") for b in args.budget))
    notes = args.notes or (None if args.cpu_smoke else str(ROOT / "bench" / "NOTES.md"))

    import torch

    if not args.cpu_smoke and not torch.cuda.is_available():
        print("no CUDA device here; run with --cpu-smoke on a CPU machine", file=sys.stderr)
        return 2
    warnings.filterwarnings("ignore", message="pack=True off CUDA")  # the smoke's dense-mask path, by design
    run = Run(args)
    if run.backend != "inductor":  # dynamo and AOT autograd still trace: the same graphs, breaks and recompiles
        compile_ = torch.compile
        torch.compile = lambda model=None, **kw: compile_(model, **{"backend": run.backend, **kw})
    machine = versions(run)
    log(f"{machine}; sections {', '.join(only)}")
    failed = [s for s in only if not run_section(run, s, budgets[s])]
    wall = time.perf_counter() - T0
    print(f"\n{run.table()}\n\n{machine}; wall {wall:.0f}s" + (f"; FAILED: {', '.join(failed)}" if failed else ""),
          flush=True)
    if notes and notes != "-":
        append_notes(Path(notes), run, "python bench/gpu_suite.py " + " ".join(sys.argv[1:]), machine, wall)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
