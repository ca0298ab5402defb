"""The heuristics stage: pre-training predictors of inoculation (seed 003, Exp 10-17, 19, 20, 22).

`logprobs.py` scores completions under the default / fixed / mix prefixes (plain or as a Ray
Data job), `seed_import.py` reads the seed repository's per-example JSON into the same table,
`metrics.py` (scalars of one w vector, w and W), `geometry.py` (PCA/SVD, angles),
`families.py` (the metric families and tables) and `performance.py` (Exp 22) turn the tables
into named heuristics, and `stage.py` runs it all for one
experiment (`python -m raysweep.heuristics exp=NAME`). Schemas: docs/heuristics.md.
"""
