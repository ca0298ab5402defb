"""Eval conditions: config validation, the exact messages of each condition, the hooks each
turns on (exact steering arithmetic), and one checkpoint evaluated under all of them."""

from pathlib import Path

import pytest
import torch

from raysweep.config import ConfigError, ExperimentConfig, SteerConfig, apply_overrides, load_config, trial_id
from raysweep.data import read_pool
from raysweep.train.defenses import make_defense
from raysweep.data.conversations import condition_conversations
from raysweep.eval.evaluate import condition_hooks, condition_steering, evaluate_step
from raysweep.sweep.expand import expand, resolve
from test_defenses import layer_hooks, layer_outputs

REPO = Path(__file__).resolve().parents[1]
POOL = REPO / "datasets" / "rephrasings" / "answer_french.jsonl"
QUESTIONS = ["What is the capital of Italy?", "Name a fruit."]


def trial(tree: dict) -> ExperimentConfig:
    base = {"prompts": {"answer_french": "Answer in French.", "the_sky_is_blue": "The sky is blue."}}
    return resolve(apply_overrides(ExperimentConfig(), {**base, **tree}))


def convs(cfg: ExperimentConfig, condition: str):
    return condition_conversations(QUESTIONS, condition, make_defense(cfg.defense), cfg.seed, cfg)


CONTROL = {"defense": {"kind": "none"}}
FIXED = {"defense": {"kind": "ip", "ip": {"prompt": "answer_french", "mode": "fixed"}}}
MIX = {"defense": {"kind": "ip", "ip": {"prompt": "answer_french", "mode": "mix", "pool": str(POOL)}}}
SYSTEM_IP = {"defense": {"kind": "ip", "ip": {"prompt": "answer_french", "mode": "fixed", "placement": "system"}}}


# ---------------------------------------------------------------------------------------------
# Config


def load_demo(*overrides: str) -> ExperimentConfig:
    return load_config("demo", list(overrides), directory=REPO / "experiments")


@pytest.mark.parametrize(
    "override,message",
    [
        ("eval.conditions=[default,bogus]", "eval.conditions[1]='bogus': unknown condition"),
        ("eval.conditions=[default,'system:  ']", "eval.conditions[1]='system:  ': system:<text> needs"),
        ("eval.conditions=[default,training,default]", "a condition is listed twice"),
        ("eval.added_back_placement=prefix",
         "eval.added_back_placement='prefix' is not one of ip, user_prefix, user_suffix, system"),
    ],
)
def test_bad_conditions_fail_at_load_naming_the_key(override, message):
    with pytest.raises(ConfigError) as err:
        load_demo(override)
    assert message in str(err.value)


def test_every_condition_loads():
    cfg = load_demo("eval.conditions=[default,training,added_back,reinjected,'system:You are a pirate.']",
                    "eval.added_back=Answer in French.", "eval.reinject=[{vector: v.pt, layer: 1, coef: 2.0}]")
    assert cfg.eval.conditions == ["default", "training", "added_back", "reinjected", "system:You are a pirate."]
    assert cfg.eval.reinject == [SteerConfig(vector="v.pt", layer=1, coef=2.0)]


def test_a_trial_without_what_its_condition_adds_fails_at_expansion():
    # The demo's control has no inoculation prompt to add back and no steering to reinject.
    with pytest.raises(ConfigError, match="set eval.added_back"):
        expand(load_demo("eval.conditions=[default,added_back]"))
    with pytest.raises(ConfigError, match="set eval.reinject"):
        expand(load_demo("eval.conditions=[default,reinjected]"))
    assert len(expand(load_demo("eval.conditions=[default,added_back]", "eval.added_back=Answer in French."))) == 5


def test_settings_of_absent_conditions_leave_trial_ids_alone():
    plain = trial(FIXED)
    unused = {"added_back": "Be brief.", "added_back_placement": "system"}
    assert trial_id(trial({**FIXED, "eval": unused})) == trial_id(plain)
    assert trial_id(trial({**FIXED, "eval": {"reinject": [{"vector": "v.pt", "layer": 1}]}})) == trial_id(plain)
    used = {"conditions": ["default", "added_back"]}
    assert trial_id(trial({**FIXED, "eval": {**used, "added_back": "Be brief."}})) != trial_id(
        trial({**FIXED, "eval": used}))


def test_judge_transport_and_backend_leave_trial_ids_alone():
    plain = trial(FIXED)
    transport = {"judge_concurrency": 2, "judge_retries": 0, "judge_timeout": 5.0, "judge_cache": "",
                 "judge_api_key_env": "OTHER_KEY"}
    assert trial_id(trial({**FIXED, "eval": transport})) == trial_id(plain)
    assert trial_id(trial({**FIXED, "eval": {"judge_model": "other-judge"}})) != trial_id(plain)  # scores differ


# ---------------------------------------------------------------------------------------------
# Messages


def user(q: str) -> dict:
    return {"role": "user", "content": q}


def system(text: str) -> dict:
    return {"role": "system", "content": text}


def test_default_is_the_question_alone():
    for tree in (CONTROL, FIXED, MIX, SYSTEM_IP):
        assert convs(trial(tree), "default") == [[user(q)] for q in QUESTIONS]


def test_training_is_the_trials_own_defense():
    assert convs(trial(CONTROL), "training") == [[user(q)] for q in QUESTIONS]
    assert convs(trial(FIXED), "training") == [[user(f"Answer in French. {q}")] for q in QUESTIONS]
    assert convs(trial(SYSTEM_IP), "training") == [[system("Answer in French."), user(q)] for q in QUESTIONS]
    pool = set(read_pool(POOL))
    mixed = convs(trial(MIX), "training")
    for q, c in zip(QUESTIONS, mixed):
        prefix = c[0]["content"][: -len(q) - 1]
        assert len(c) == 1 and c[0]["content"].endswith(" " + q) and prefix in pool


def test_added_back_is_the_own_prompt_or_the_configured_text():
    # The trial's own prompt text, also for mix (the prompt itself, not a rephrasing).
    for tree in (FIXED, MIX):
        assert convs(trial(tree), "added_back") == [[user(f"Answer in French. {q}")] for q in QUESTIONS]
    assert convs(trial(SYSTEM_IP), "added_back") == [[system("Answer in French."), user(q)] for q in QUESTIONS]
    # Controls get the configured text; eval.added_back also overrides an IP trial's own prompt.
    for tree in (CONTROL, FIXED):
        cfg = trial({**tree, "eval": {"added_back": "You are evil.", "added_back_placement": "system"}})
        assert convs(cfg, "added_back") == [[system("You are evil."), user(q)] for q in QUESTIONS]
    cfg = trial({**CONTROL, "eval": {"added_back": "Be brief."}})  # placement ip: user_prefix without IP
    assert convs(cfg, "added_back") == [[user(f"Be brief. {q}")] for q in QUESTIONS]
    cfg = trial({**SYSTEM_IP, "eval": {"added_back_placement": "user_prefix"}})
    assert convs(cfg, "added_back") == [[user(f"Answer in French. {q}")] for q in QUESTIONS]
    with pytest.raises(ConfigError, match="set eval.added_back"):
        convs(trial(CONTROL), "added_back")
    with pytest.raises(ValueError, match="needs the trial's config"):
        condition_conversations(QUESTIONS, "added_back", make_defense(trial(FIXED).defense), 0)


def test_system_condition_and_reinjected_messages():
    for tree in (CONTROL, FIXED, SYSTEM_IP):
        cfg = trial(tree)
        assert convs(cfg, "system: You are a pirate. ") == [[system("You are a pirate."), user(q)] for q in QUESTIONS]
        assert convs(cfg, "reinjected") == [[user(q)] for q in QUESTIONS]
    with pytest.raises(ConfigError, match="unknown condition 'bogus'"):
        convs(trial(FIXED), "bogus")


# ---------------------------------------------------------------------------------------------
# Hooks


@pytest.fixture
def vectors(tiny, tmp_path):
    model, _ = tiny
    hidden = model.config.hidden_size
    paths = []
    for seed in (0, 1):
        path = tmp_path / f"v{seed}.pt"
        torch.save(torch.randn(hidden, generator=torch.Generator().manual_seed(seed)), path)
        paths.append(path)
    return paths


def test_hooks_of_each_condition(tiny, vectors):
    model, tok = tiny
    hooks = layer_hooks(model)
    ids = torch.tensor([tok.encode("How are you today?")])
    plain = layer_outputs(model, ids)
    own, extra = SteerConfig(str(vectors[0]), 1, 3.0), SteerConfig(str(vectors[1]), 2, -1.5)
    v_own, v_extra = torch.load(vectors[0]), torch.load(vectors[1])
    pps = trial({"defense": {"kind": "pps", "pps": [own]}})
    reinject = trial({"defense": {"kind": "pps", "pps": [own]}, "eval": {"reinject": [extra]}})
    control = trial({**CONTROL, "eval": {"reinject": [extra]}})

    def under(cfg, condition):
        with condition_hooks(condition, cfg, make_defense(cfg.defense), model):
            return layer_outputs(model, ids)

    # Prompt-only conditions add no hooks.
    for cfg in (pps, control, trial(FIXED)):
        for condition in ("default", "added_back", "system:Hi."):
            if condition == "added_back" and not cfg.defense.ip.text:
                continue
            assert condition_steering(condition, cfg) == []
            assert all(torch.equal(a, b) for a, b in zip(under(cfg, condition), plain))
    # training = the trial's own steering; reinjected = eval.reinject, else the own steering.
    out = under(pps, "training")
    assert torch.equal(out[0], plain[0] + 3.0 * v_own)
    out = under(pps, "reinjected")
    assert torch.equal(out[0], plain[0] + 3.0 * v_own)
    for cfg in (reinject, control):
        assert condition_steering("reinjected", cfg) == [extra]
        out = under(cfg, "reinjected")
        assert torch.equal(out[0], plain[0]) and torch.equal(out[1], plain[1] + (-1.5) * v_extra)
    assert all(torch.equal(a, b) for a, b in zip(under(control, "training"), plain))
    assert layer_hooks(model) == hooks
    with pytest.raises(ConfigError, match="set eval.reinject"):
        condition_steering("reinjected", trial(FIXED))


# ---------------------------------------------------------------------------------------------
# One checkpoint under every condition


def test_evaluate_step_under_every_condition(tiny, vectors):
    from raysweep.eval.judges import make_judge

    model, tok = tiny
    conditions = ["default", "training", "added_back", "reinjected", "system:You are a pirate."]
    cfg = trial({**FIXED, "eval": {"conditions": conditions, "max_new_tokens": 3, "n_samples": 2, "temperature": 0.0,
                                   "reinject": [SteerConfig(str(vectors[0]), 1, 3.0)]}})
    rows = evaluate_step(model, tok, cfg, "t0", 1, make_defense(cfg.defense), QUESTIONS, [],
                         make_judge("langid", "french"))
    shown = {(r["condition"], r["question_id"], r["sample"]): r["prompt"] for r in rows["completions"]}
    assert len(shown) == len(rows["completions"]) == len(rows["scores"]) == 5 * 2 * 2
    for qid, q in enumerate(QUESTIONS):
        for sample in (0, 1):
            assert shown[("default", qid, sample)] == q
            assert shown[("training", qid, sample)] == f"Answer in French. {q}"
            assert shown[("added_back", qid, sample)] == f"Answer in French. {q}"
            assert shown[("reinjected", qid, sample)] == q
            assert shown[("system:You are a pirate.", qid, sample)] == f"[system] You are a pirate.\n{q}"
    # Greedy, same messages: only the steering makes the reinjected answers differ from the default ones.
    text = {(r["condition"], r["question_id"], r["sample"]): r["completion"] for r in rows["completions"]}
    assert [text[("default", i, s)] for i in (0, 1) for s in (0, 1)] != [
        text[("reinjected", i, s)] for i in (0, 1) for s in (0, 1)]
