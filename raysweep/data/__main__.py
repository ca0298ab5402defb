"""`python -m raysweep.data fetch|rephrase|generate ...`.

fetch: the seeds' public data from its pinned sources into the data root (raysweep/data/fetch.py).
rephrase, generate: rephrasing pools and trait training data from a model (raysweep/data/datagen.py).
Each command parses its own arguments; this module only picks the command.
"""

from __future__ import annotations

import argparse
import sys

GENERATE = ("rephrase", "generate")  # the commands of raysweep/data/datagen.py
DESCRIPTION = "Fetch the seeds' public data, or generate rephrasing pools and trait training data with a model."


def _overview() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m raysweep.data", description=DESCRIPTION,
                                epilog="`python -m raysweep.data COMMAND --help` for a command's arguments.")
    sub = p.add_subparsers(dest="command", required=True, metavar="{fetch,rephrase,generate}")
    sub.add_parser("fetch", help="the seeds' public data (seed003, em, persona_vectors, all) into the data root")
    sub.add_parser("rephrase", help="N distinct rephrasings of a prompt, as a rephrasing pool")
    sub.add_parser("generate", help="trait training data: answers under a datagen system prompt")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["fetch"]:
        from .fetch import main as fetch_main

        return fetch_main(argv[1:])
    if argv[:1] and argv[0] in GENERATE:
        from raysweep.data.datagen import main as datagen_main

        return datagen_main(argv)
    _overview().parse_args(argv)  # no command, --help or an unknown one: usage, and exit
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
