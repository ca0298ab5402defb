"""Mechanistic analyses of defensive training (seed 001): gradient manipulation during training,
activation-gradient analyses, persona-vector extraction. Entry: `python -m raysweep.mech exp=NAME`.

Layer convention everywhere in this package (as in `defenses.steer`): layer l (1-based) is the
output of decoder layer l, i.e. the residual stream after block l; index 0 of a
[num_layers+1, hidden] vector file is the embedding output.
"""
