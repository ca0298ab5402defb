"""Where raysweep keeps what it fetches and builds (a leaf module: imports nothing of raysweep).

- `data_root()`: the seeds' public data, fetched from its sources by
  `python -m raysweep.data fetch` (raysweep/data/fetch.py): `$RAYSWEEP_DATA`, default
  `~/.cache/raysweep/data`, laid out as the registry (raysweep/data/sources.tsv) names it.
  Experiment files name these files relative to it: `${data:inoculation/rephrasings}`.
"""

from __future__ import annotations

import os
from pathlib import Path

DATA_ENV = "RAYSWEEP_DATA"


def data_root() -> Path:
    """The data root: $RAYSWEEP_DATA, else ~/.cache/raysweep/data (not created here)."""
    return Path(os.environ.get(DATA_ENV) or Path.home() / ".cache" / "raysweep" / "data").expanduser().absolute()
