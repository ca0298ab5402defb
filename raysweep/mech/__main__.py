"""`python -m raysweep.mech exp=NAME [key=value ...]`: the mechanistic stage of one experiment.

The experiment's `mech` section (raysweep/mech/config.py) says which analyses run;
`dry_run=true` checks the inputs and prints the plan, loading no model.
"""

from __future__ import annotations

import sys

from ..errors import ConfigError
from ..config.load import stage_main

USAGE = "usage: python -m raysweep.mech exp=NAME [key=value ...]   (dry_run=true prints the plan)"


def run(cfg) -> int:
    from .stage import check, expand_conditions, run_stage

    if not cfg.mech.analyses:
        raise ConfigError(f"experiment {cfg.name!r} lists no mech.analyses")
    if cfg.dry_run:
        tables = check(cfg)
        conds = [c.name for c in expand_conditions(cfg.mech)]
        print(f"analyses {list(cfg.mech.analyses)} on {cfg.model.name}; vectors {sorted(tables)}; "
              f"{len(conds)} conditions: {', '.join(conds)}")
        return 0
    run_stage(cfg)
    return 0


def main(argv: list[str] | None = None) -> int:
    return stage_main(sys.argv[1:] if argv is None else argv, USAGE, run)


if __name__ == "__main__":
    sys.exit(main())
