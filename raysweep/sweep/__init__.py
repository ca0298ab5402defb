"""The sweep: expand an experiment into trials (`expand.py`), run them (`run.py`, the CLI of
`python -m raysweep.run`), storage of their results (`storage.py`) and `ray_runner.py`, the only
module that touches Ray."""
