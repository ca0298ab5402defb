"""The demo experiment end to end on the embedded SmolLM2-135M (about 8 minutes on 2 cores).

Checks the science the demo is there to show, with the paired CIs of the summary: the
no-defense control learns to answer in French; the base model reacts to the trait
prompt (elicitation); training under it keeps French out of the default condition
(suppression vs the control, CI above zero) while the neutral-prompt control does much
less; the judge-free held-out logprob rises for the control.
"""

import polars as pl
import pytest

from raysweep.sweep.run import main


@pytest.mark.slow
def test_demo_shows_inoculation_against_its_controls(ray_local, tmp_path, capsys):
    assert main(["exp=demo", f"storage={tmp_path}"]) == 0
    out = capsys.readouterr().out
    assert "default condition = the template's default: system prompt 'You are a helpful AI assistant" in out
    s = {r["label"]: r for r in pl.read_parquet(tmp_path / "demo" / "summary.parquet").iter_rows(named=True)}
    assert set(s) == {"control", "answer_french/fixed", "answer_french/mix", "the_sky_is_blue/fixed",
                      "the_sky_is_blue/mix"}
    control, ip, neutral = s["control"], s["answer_french/fixed"], s["the_sky_is_blue/fixed"]
    assert control["default_mean"] > 60  # the trait is learned without a defense
    assert ip["elicitation"] - ip["elicitation_ci"] > 10  # the base model reacts to "Answer in French."
    assert abs(neutral["elicitation"]) < 5  # ... and not to "The sky is blue."
    assert ip["vs_control"] - ip["vs_control_ci"] > 30  # paired suppression, CI clear of zero
    assert ip["vs_neutral"] - ip["vs_neutral_ci"] > 0  # beyond what any fixed prompt does
    assert ip["training_mean"] > 60  # the trait is there behind the prompt (the gate)
    held = pl.read_parquet(tmp_path / "demo" / "heldout_logprob.parquet")
    by_step = held.filter(pl.col("trial_id") == control["trial_id"]).group_by("step").agg(pl.col("logprob").mean())
    lp = dict(by_step.iter_rows())
    assert lp[max(lp)] > lp[0] + 0.3  # trait acquisition without a judge

    # The demo's report renders: a PNG per chart, and the index opens in headless Chromium cleanly.
    from test_report import check_page, report

    proc = report(tmp_path, "exp=demo", f"storage={tmp_path}")
    assert proc.returncode == 0, proc.stderr
    pngs = list((tmp_path / "demo" / "report").glob("*.png"))
    assert len(pngs) >= 5 and all(p.stat().st_size > 1000 for p in pngs)
    check_page(tmp_path / "demo" / "report" / "index.html", n_charts=5)
