"""`python -m raysweep.heuristics exp=NAME [key=value ...]`: the heuristics stage of one experiment.

The experiment's `heuristics` section (raysweep/heuristics/config.py) says what to score;
`dry_run=true` prints the plan and scores nothing.

`python -m raysweep.heuristics import FILE [--tokens FILE] exp=NAME [key=value ...]` writes the
same tables from a seed per-example logprob file (`results/perplexity_heuristic_*.json`, and
its per-token twin for the token-wise metrics), with the experiment's prompt groups, traits
and fitting sets (stage.import_stage).
"""

from __future__ import annotations

import sys

from ..errors import ConfigError
from ..config.load import stage_main

USAGE = ("usage: python -m raysweep.heuristics exp=NAME [key=value ...]   (dry_run=true prints the plan)\n"
         "       python -m raysweep.heuristics import FILE [--tokens FILE] exp=NAME [key=value ...]")


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
        prompts, labels = resolve_prompts(h, cfg.prompts, cfg.prompt_groups)
        sets = read_sets(h, cfg.seed)
        n_examples = sum(len(c) for c in sets.values())
        sizes = {s: len(c) for s, c in sets.items()}
        n_rows = n_examples + len(prompts) * len(h.variants) * n_examples
        print(f"{len(prompts)} prompts ({len(labels)} labelled), sets {sizes}: {n_rows} rows")
        return 0
    from .stage import run_stage

    run_stage(cfg, h)
    return 0


def import_args(argv: list[str]) -> tuple[str, str, list[str]]:
    """(FILE, tokens FILE or "", the rest) of `import FILE [--tokens FILE] ...`."""
    rest, tokens = list(argv[1:]), ""
    if "--tokens" in rest:
        i = rest.index("--tokens")
        if i + 1 >= len(rest):
            raise ConfigError(f"--tokens needs a file\n{USAGE}")
        tokens = rest.pop(i + 1)
        rest.pop(i)
    files = [a for a in rest if "=" not in a]
    if len(files) != 1:
        raise ConfigError(f"import takes one seed file (results/perplexity_heuristic_*.json)\n{USAGE}")
    return files[0], tokens, [a for a in rest if "=" in a]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] != ["import"]:
        return stage_main(argv, USAGE, run)
    try:
        path, tokens, rest = import_args(argv)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    def imported(cfg) -> int:
        from .stage import import_stage

        import_stage(cfg, heuristics_config(cfg), path, tokens or None)
        return 0

    return stage_main(rest, USAGE, imported)


if __name__ == "__main__":
    sys.exit(main())
