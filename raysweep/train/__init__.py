"""Training: one trial (`trial.py`), the optimiser step (`step.py`), the defenses
(`defenses.py`), training-time gradient manipulation (`grad.py`) and model loading (`models.py`)."""
