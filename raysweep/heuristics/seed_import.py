"""Read the seed repository's per-example logprob files into this stage's tables.

`results/perplexity_heuristic_<model>.json` (seed 003, Exp 11-12):

    params.prompts            {key: text}
    baseline.lp_train_default [K]  per training completion
    baseline.lp_ctrl_default  [C]  per control completion
    prompts[key].lp_train_inoc [K], .lp_ctrl_inoc [C], .lp_train_mix [K]   (mix: index-matched)

`results/perplexity_heuristic_tokens_<model>.json` (Exp 16) has the per-token lists
`baseline.lp_train_default_tokens` and `prompts[key].lp_train_inoc_tokens` / `.lp_train_mix_tokens`.

The seed's per-example value is the mean log-probability per completion token (its
`lp_per_tok`), so it goes to `mean_logprob`; `logprob` (sum) and `n_tokens` are null.
null / NaN entries stay NaN. Prompts missing a field simply have no rows for it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .logprobs import schema

# (baseline field, prompt field, variant, set)
FIELDS = (
    ("lp_train_default", "lp_train_inoc", "fixed", "train"),
    ("lp_ctrl_default", "lp_ctrl_inoc", "fixed", "control"),
    (None, "lp_train_mix", "mix", "train"),
)
TOKEN_FIELDS = (("lp_train_inoc_tokens", "fixed"), ("lp_train_mix_tokens", "mix"))


def _load(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: file not found")
    data = json.loads(path.read_text())
    ok = isinstance(data, dict) and all(isinstance(data.get(k), dict) for k in ("baseline", "prompts"))
    if not ok:
        raise ValueError(f'{path}: expected an object with "baseline" and "prompts"')
    return data


def _num(x: Any) -> float:
    return float("nan") if x is None else float(x)


def seed_prompts(path: str | Path) -> dict[str, str]:
    """key -> prompt text of a seed perplexity file (params.prompts, else each entry's "prompt")."""
    data = _load(path)
    texts = dict((data.get("params") or {}).get("prompts") or {})
    for key, entry in data["prompts"].items():
        if key not in texts and isinstance(entry, dict) and isinstance(entry.get("prompt"), str):
            texts[key] = entry["prompt"]
    return texts


def import_perplexity_json(path: str | Path):
    """The logprobs table of a seed `perplexity_heuristic_*.json` (default rows have prompt_key "")."""
    import pyarrow as pa

    data = _load(path)
    base, prompts = data["baseline"], data["prompts"]
    cols: dict[str, list] = {c: [] for c in ("prompt_key", "variant", "set", "example_id", "mean_logprob")}

    def add(key: str, variant: str, set_name: str, values: list) -> None:
        for k, v in enumerate(values):
            for c, val in zip(cols, (key, variant, set_name, k, _num(v))):
                cols[c].append(val)

    for base_field, _pf, _v, set_name in FIELDS:
        if base_field and base_field in base:
            add("", "default", set_name, base[base_field])
    for key, entry in prompts.items():
        for _bf, prompt_field, variant, set_name in FIELDS:
            if isinstance(entry, dict) and prompt_field in entry:
                add(key, variant, set_name, entry[prompt_field])
    n = len(cols["prompt_key"])
    return pa.table({**cols, "logprob": [None] * n, "n_tokens": [None] * n}).select(schema("logprobs").names).cast(
        schema("logprobs"))


def import_tokens_json(path: str | Path, set_name: str = "train"):
    """The token_logprobs table of a seed `perplexity_heuristic_tokens_*.json`."""
    import pyarrow as pa

    data = _load(path)
    cols: dict[str, list] = {c: [] for c in ("prompt_key", "variant", "set", "example_id", "token_logprobs")}

    def add(key: str, variant: str, seqs: list) -> None:
        for k, seq in enumerate(seqs):
            for c, val in zip(cols, (key, variant, set_name, k, [_num(x) for x in (seq or [])])):
                cols[c].append(val)

    add("", "default", data["baseline"].get("lp_train_default_tokens", []))
    for key, entry in data["prompts"].items():
        for field, variant in TOKEN_FIELDS:
            if isinstance(entry, dict) and field in entry:
                add(key, variant, entry[field])
    return pa.table(cols, schema=schema("token_logprobs"))
