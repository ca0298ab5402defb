"""The report of an experiment: `python -m raysweep.report exp=NAME` (page.py)."""
