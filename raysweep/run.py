"""`python -m raysweep.run exp=NAME [key=value ...]`: run an experiment's sweep (raysweep/sweep/run.py)."""

import sys

from .sweep.run import main

if __name__ == "__main__":
    sys.exit(main())
