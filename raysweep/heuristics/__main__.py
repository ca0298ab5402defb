"""`python -m raysweep.heuristics exp=NAME [key=value ...]`: the heuristics stage of one experiment.

The experiment's `heuristics` section (raysweep/heuristics/config.py) says what to score;
`dry_run=true` prints the plan and scores nothing.
"""

from __future__ import annotations

import sys

from ..config import ConfigError, stage_main

USAGE = "usage: python -m raysweep.heuristics exp=NAME [key=value ...]   (dry_run=true prints the plan)"


def heuristics_config(cfg):
    """The experiment's HeuristicsConfig (its `heuristics` field)."""
    h = getattr(cfg, "heuristics", None)
    if h is None:
        raise ConfigError("this ExperimentConfig has no `heuristics` field (raysweep/heuristics/config.py)")
    return h


def run(cfg) -> int:
    h = heuristics_config(cfg)
    if cfg.dry_run:
        from .config import validate
        from .stage import read_sets, resolve_prompts

        validate(h)
        prompts, labels = resolve_prompts(h, cfg.prompts)
        sets = read_sets(h, cfg.seed)
        n_examples = sum(len(c) for c in sets.values())
        sizes = {s: len(c) for s, c in sets.items()}
        n_rows = n_examples + len(prompts) * len(h.variants) * n_examples
        print(f"{len(prompts)} prompts ({len(labels)} labelled), sets {sizes}: {n_rows} rows")
        return 0
    from .stage import run_stage

    run_stage(cfg, h)
    return 0


def main(argv: list[str] | None = None) -> int:
    return stage_main(sys.argv[1:] if argv is None else argv, USAGE, run)


if __name__ == "__main__":
    sys.exit(main())
