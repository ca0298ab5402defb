"""Which trials a trial is compared with (raysweep.sweep.run.controls): unit tier, no model, no Ray.

A trial's no-defense and neutral-prompt controls differ from it only in the defense being
compared (kind, IP prompt, PPS triples; the neutral control also has its IP mode and
placement); every other axis, gradient manipulation (`defense.grad.*`) included, is equal.
"""

from pathlib import Path

import polars as pl

from raysweep.analysis import behaviour_matrix
from raysweep.config import load_config
from raysweep.sweep.run import controls
from raysweep.sweep.expand import expand

REPO = Path(__file__).resolve().parents[1]

GRID = """
defaults: [base, _self_]
model: {name: tiny-random}
neutral_prompt: the_sky_is_blue
prompts: {answer_french: Answer in French., the_sky_is_blue: The sky is blue.}
data: {train: datasets/french_demo/train.jsonl}
defense: {grad: {vector: v.safetensors}}
sweep:
  arms:
    - defense: {kind: none}
    - defense: {kind: ip, ip: {prompt: [answer_french, the_sky_is_blue], mode: fixed}}
    - defense: {kind: pps, pps: [{vector: v.safetensors, layer: 1, coef: 2.0}]}
  grid:
    train: {lr: [1.0e-4, 1.0e-5]}
    defense: {grad: {mode: [none, attenuate]}}
"""


def _by(trials):
    """(kind, prompt, grad mode, lr) -> trial id."""
    return {(t.config.defense.kind, t.config.defense.ip.prompt, t.config.defense.grad.mode, t.config.train.lr): t.id
            for t in trials}


def test_controls_keep_grad_mode_and_other_axes(tmp_path):
    (tmp_path / "grid.yaml").write_text(GRID)
    trials = expand(load_config("grid", directory=tmp_path))
    assert len(trials) == 4 * 2 * 2  # (none, 2 IP prompts, PPS) x lr x grad mode
    ids = _by(trials)
    ctl = controls(trials, "the_sky_is_blue")
    for t in trials:
        d, lr = t.config.defense, t.config.train.lr
        none_id, neutral_id = ctl[t.id]
        assert none_id == ids[("none", "", d.grad.mode, lr)], t.label
        assert neutral_id == (ids[("ip", "the_sky_is_blue", d.grad.mode, lr)] if d.kind == "ip" else ""), t.label


def test_gradmanip_controls_have_the_same_grad_mode():
    """001 Table 1: each defense under a gradient manipulation vs no defense under the same one."""
    trials = expand(load_config("pps_vs_ip_gradmanip", directory=REPO / "experiments"))
    assert len(trials) == 12
    none = {t.config.defense.grad.mode: t.id for t in trials if t.config.defense.kind == "none"}
    assert sorted(none) == ["amplify", "attenuate", "neutralize", "none"]
    ctl = controls(trials, "")
    for t in trials:
        assert ctl[t.id] == (none[t.config.defense.grad.mode], ""), t.label


def test_behaviour_matrix_vs_none_uses_the_same_grad_mode(tmp_path):
    """behaviour_matrix's vs_none reads trials.control_id: it is paired within a grad mode."""
    (tmp_path / "grid.yaml").write_text(GRID)
    trials = [t for t in expand(load_config("grid", directory=tmp_path)) if t.config.train.lr == 1e-4]
    ctl = controls(trials, "the_sky_is_blue")
    # Score = 10 x (grad mode index) + (5 for a defended trial): vs none is +5 only within a mode.
    mode = {"none": 0, "attenuate": 1}
    score = {t.id: 10 * mode[t.config.defense.grad.mode] + (5 if t.config.defense.kind != "none" else 0) for t in trials}
    tdf = pl.DataFrame([{"trial_id": t.id, "label": t.label, "defense": t.config.defense.kind, "start": "",
                         "control_id": ctl[t.id][0], "neutral_id": ctl[t.id][1], "axes": "{}"} for t in trials])
    sdf = pl.DataFrame([{"trial_id": t.id, "step": s, "trait": "french", "condition": "default", "question_id": q,
                         "sample": 0, "score": float(score[t.id] + q)}
                        for t in trials for s in (0, 4) for q in range(3)])
    m = behaviour_matrix(sdf, tdf)
    defended = m.filter(pl.col("defense") != "none")
    assert defended.height == 6
    assert defended["vs_none"].to_list() == [5.0] * 6
