"""The report of an experiment: `python -m raysweep.report exp=NAME [key=value ...]` (__main__.py).

load.py reads the tables (a directory or an object store), frames.py reshapes them for the
report (the statistics come from raysweep.analysis), charts_sweep / charts_heuristics /
charts_mech draw the charts of each stage's tables with chart_parts.py, tables.py the summary
tables, and page.py writes the pages."""
