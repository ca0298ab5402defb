"""experiments/demo_select.yaml end to end on the embedded SmolLM2-135M (about 12 minutes on 2
cores): the heuristics stage ranks the 27 French and neutral candidates by PH, 8 trials train,
and the run reports how well PH predicted suppression.

What it checks is what the README reports, measured, not assumed: the top-ranked prompts
suppress French in the default condition more than the bottom-ranked ones (by their mean
suppression vs the no-defense control), and PH correlates positively with suppression over
the trained prompts (Pearson r, with its Fisher-z CI above zero).
"""

import polars as pl
import pytest

from raysweep.sweep.run import main


@pytest.mark.slow
def test_demo_select_trains_the_selection_and_reports_prediction(ray_local, tmp_path, capsys):
    assert main(["exp=demo_select", f"storage={tmp_path}"]) == 0
    out = capsys.readouterr().out
    exp = tmp_path / "demo_select"
    sel = pl.read_parquet(exp / "selection.parquet")
    assert sel.height == 27
    counts = dict(sel.group_by("selected_as").len().iter_rows())
    assert counts == {"top": 3, "bottom": 2, "random": 1, "control": 1, "not": 20}
    trials = pl.read_parquet(exp / "trials.parquet")
    assert trials.height == 8 and trials["status"].to_list() == ["done"] * 8
    fit = pl.read_parquet(exp / "prediction_fit.parquet").row(0, named=True)
    assert (fit["trait"], fit["mode"], fit["heuristic"], fit["n"]) == ("french", "fixed", "ph_fixed", 7)
    assert fit["top_mean"] - fit["bottom_mean"] > 30  # measured: 82.2 vs 1.5
    assert fit["pearson_lo"] > 0  # measured: r = +0.91 [+0.51, +0.99]
    assert "predicted vs observed: ph_fixed" in out and "top 3:" in out
