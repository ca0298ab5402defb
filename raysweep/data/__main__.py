"""`python -m raysweep.data rephrase|generate ...` (see raysweep/datagen.py)."""

from raysweep.datagen import main

raise SystemExit(main())
