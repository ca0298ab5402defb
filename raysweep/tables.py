"""Arrow tables on disk: declared schemas, atomic writes (temp + rename), concatenation.

A table is complete or absent, never partial: every write goes to a temporary name in
the same directory and is renamed into place.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

SCHEMAS: dict[str, pa.Schema] = {
    "losses": pa.schema(
        [("trial_id", pa.string()), ("step", pa.int64()), ("loss", pa.float64()), ("lr", pa.float64()),
         ("grad_norm", pa.float64()), ("n_tokens", pa.int64())]
    ),
    "completions": pa.schema(
        [("trial_id", pa.string()), ("step", pa.int64()), ("condition", pa.string()),
         ("question_id", pa.int64()), ("sample", pa.int64()), ("prompt", pa.string()), ("completion", pa.string())]
    ),
    "scores": pa.schema(
        [("trial_id", pa.string()), ("step", pa.int64()), ("condition", pa.string()),
         ("question_id", pa.int64()), ("sample", pa.int64()), ("trait", pa.string()), ("score", pa.float64()),
         ("judge", pa.string()), ("reason", pa.string()), ("judge_prompt", pa.string()), ("raw", pa.string())]
    ),
    "heldout_logprob": pa.schema(
        [("trial_id", pa.string()), ("step", pa.int64()), ("example_id", pa.int64()),
         ("logprob", pa.float64()), ("n_tokens", pa.int64())]
    ),
    # raysweep.mech (001): `model` = base or adapter label; a condition = IP prompt key (`ip`) and/or
    # steering (`steer` = vector@layers, `coef`); `layer` = decoder layer output (1-based).
    "mech_grad_cosine": pa.schema(  # token-averaged cos(dL/dh, vector) per sequence, layer, vector
        [("model", pa.string()), ("condition", pa.string()), ("ip", pa.string()), ("steer", pa.string()),
         ("coef", pa.float64()), ("sequence_id", pa.int64()), ("layer", pa.int64()), ("vector", pa.string()),
         ("cosine", pa.float64()), ("n_tokens", pa.int64())]
    ),
    "mech_loss": pa.schema(  # mean next-token CE over assistant tokens per sequence
        [("model", pa.string()), ("condition", pa.string()), ("ip", pa.string()), ("steer", pa.string()),
         ("coef", pa.float64()), ("sequence_id", pa.int64()), ("loss", pa.float64()), ("n_tokens", pa.int64())]
    ),
    "mech_grad_pca": pa.schema(  # uncentred PCA of (defended - baseline) mean gradients: eigenvalues
        [("model", pa.string()), ("defended", pa.string()), ("baseline", pa.string()), ("layer", pa.int64()),
         ("component", pa.int64()), ("eigenvalue", pa.float64()), ("explained", pa.float64()),
         ("cumulative", pa.float64())]
    ),
    "mech_grad_pca_cosine": pa.schema(  # cosine of each component ("1", "2", ... or "mean") with references
        [("model", pa.string()), ("defended", pa.string()), ("baseline", pa.string()), ("layer", pa.int64()),
         ("component", pa.string()), ("reference", pa.string()), ("cosine", pa.float64())]
    ),
    "mech_grad_pca_scores": pa.schema(  # per-sample projection of the difference onto each component
        [("model", pa.string()), ("defended", pa.string()), ("baseline", pa.string()), ("layer", pa.int64()),
         ("component", pa.int64()), ("sequence_id", pa.int64()), ("score", pa.float64())]
    ),
    "mech_ip_pps_similarity": pa.schema(  # mean tokenwise cos(IP gradient, steered gradient), aligned positions
        [("model", pa.string()), ("condition", pa.string()), ("ip", pa.string()), ("steer", pa.string()),
         ("coef", pa.float64()), ("ip_condition", pa.string()), ("sequence_id", pa.int64()),
         ("layer", pa.int64()), ("cosine", pa.float64()), ("n_tokens", pa.int64())]
    ),
    "mech_projection": pa.schema(  # mean over assistant tokens of h . v/|v|, no defense in the pass
        [("model", pa.string()), ("sequence_id", pa.int64()), ("layer", pa.int64()), ("vector", pa.string()),
         ("projection", pa.float64()), ("n_tokens", pa.int64())]
    ),
    "mech_vector_samples": pa.schema(  # persona-vector extraction: every generated answer, its scores, kept or not
        [("trait", pa.string()), ("polarity", pa.string()), ("instruction_id", pa.int64()),
         ("question_id", pa.int64()), ("sample", pa.int64()), ("system", pa.string()), ("question", pa.string()),
         ("answer", pa.string()), ("trait_score", pa.float64()), ("coherence", pa.float64()),
         ("reason", pa.string()), ("kept", pa.bool_())]
    ),
}


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: str | Path, obj: Any) -> None:
    atomic_write_bytes(path, json.dumps(obj, indent=2, sort_keys=True, default=str).encode())


def write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def write_table(path: str | Path, table: pa.Table | list[dict[str, Any]], name: str | None = None) -> Path:
    """Write rows or a table as Parquet atomically; `name` picks a declared schema."""
    path = Path(path)
    if not isinstance(table, pa.Table):
        schema = SCHEMAS[name] if name else None
        table = pa.Table.from_pylist(table, schema=schema) if table or schema else pa.table({})
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        pq.write_table(table, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read_table(path: str | Path) -> pa.Table:
    return pq.read_table(str(path))


def concat_parts(paths: list[Path], name: str | None = None) -> pa.Table:
    """Concatenate per-trial part files into one table (the declared schema when empty)."""
    tables = [pq.read_table(str(p)) for p in paths]
    if not tables:
        return SCHEMAS[name].empty_table() if name else pa.table({})
    return pa.concat_tables(tables, promote_options="default")
