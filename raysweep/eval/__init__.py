"""Evaluation: the conditions and work rows (`evaluate.py`), the engines behind one interface
(`engine.py`, `generation.py`), the scoring kernel every per-token log-prob goes through
(`scoring.py`), the post-sweep path (`posteval.py`), and the judges (`judges.py`,
`rubrics.py`, `judge_scores.py`, `judge_digits.py`, `endpoint.py`, `judge_cache.py`)."""
