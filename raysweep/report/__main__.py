"""`python -m raysweep.report exp=NAME`: see raysweep/report/page.py."""

import sys

from .page import main

sys.exit(main())
