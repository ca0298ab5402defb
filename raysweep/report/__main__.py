"""`python -m raysweep.report exp=NAME [key=value ...]`: the report of one experiment.

The experiment is loaded as every stage loads it (config.load.stage_main: experiments/NAME.yaml
with Hydra overrides; a bad key or value exits 2 naming it); the report uses its `storage` and
`name`: it reads the tables under `<storage>/<name>/` and writes `report/` beside them (page.py
says what is in it).

- A local storage (`storage=runs`, the default) is used in place: `<storage>/<name>/report/`.
- An object store (`storage=s3://bucket/prefix`, see sweep/storage.py) is read through pyarrow
  (the tables are not copied to disk); the report is drawn into the experiment's node-local
  scratch mirror (`$RAYSWEEP_SCRATCH/report/s3/bucket/prefix/<name>/report/`, a folder a
  browser opens) and then uploaded to `<storage>/<name>/report/`, replacing the report there
  (charts the tables no longer support are deleted). Reading needs only read access: when the
  upload fails, the local copy stays and the failure is printed.

Both paths are printed. Exit status: 0; 1 when a chart or table failed (the rest is written) or
the upload failed; 2 on bad input (a config error, a bad storage URI, no experiment directory
or no tables).
"""

from __future__ import annotations

import sys
from pathlib import Path

from ..config.load import stage_main
from ..sweep.storage import is_uri, join_uri, open_experiment

USAGE = "usage: python -m raysweep.report exp=NAME [key=value ...]   (e.g. storage=s3://bucket/prefix)"


def report(cfg) -> int:
    """Draw the report of `cfg`'s experiment beside its tables; print where it is."""
    from .page import build_report

    uri = join_uri(cfg.storage, cfg.name) if is_uri(cfg.storage) else str(Path(cfg.storage) / cfg.name)
    store = open_experiment(uri, role="report")  # a local directory, or the store's scratch mirror
    index, failures = build_report(store.uri, out=store.exp_dir / "report")
    if is_uri(store.uri):
        try:
            store.push("report", mirror=True)
            print(f"report: {join_uri(store.uri, 'report', 'index.html')}")
        except OSError as exc:
            failures.append(f"uploading the report to {join_uri(store.uri, 'report')} failed: {exc}")
    print(f"report: {index}")
    for f in failures:
        print(f"error: {f}", file=sys.stderr)
    return 1 if failures else 0


def main(argv: list[str] | None = None) -> int:
    return stage_main(sys.argv[1:] if argv is None else argv, USAGE, report)


if __name__ == "__main__":
    sys.exit(main())
