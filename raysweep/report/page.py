"""The report's pages: `build_report` draws every chart and table of a run and writes them.

Writes the report folder (`<exp>/report/` beside the tables unless told otherwise): one Altair
chart per result the tables hold, each as `<name>.html` and `<name>.png` (PNG rendered offline
by vl-convert), and `index.html` with the summary tables (plain HTML) and every chart. The
pages load Vega, Vega-Lite and Vega-Embed from `vega-bundle.js` in the same folder (written
from vl-convert's bundle), so the folder renders with no network. A chart whose tables are
absent is skipped with a note on the index page; a chart or table that fails is a failure,
noted and returned, and the rest of the report is still written. CHARTS lists the charts in
page order; they live by the stage whose tables they draw (charts_sweep, charts_heuristics,
charts_mech), the tables in tables.py.
"""

from __future__ import annotations

import html
import json
import traceback
from collections.abc import Callable
from pathlib import Path

from ..sweep.storage import is_uri
from .charts_heuristics import chart_angles, chart_embeddings, chart_heuristics, chart_prediction
from .charts_mech import chart_grad_cosine, chart_intensity
from .charts_sweep import (chart_behaviour_matrix, chart_behaviour_vs_none, chart_elicitation_vs_suppression, chart_em,
                           chart_final_scores, chart_fixed_vs_mix, chart_heldout, chart_losses, chart_score_curves,
                           chart_suppression)
from .frames import CI_NOTE
from .load import ReportError, Run, Skip, load_run
from .tables import TABLE_BUILDERS, html_table

CHARTS: list[tuple[str, str, Callable]] = [
    ("final_scores", "Trait score at the final step", chart_final_scores),
    ("suppression", "Suppression vs the controls", chart_suppression),
    ("elicitation_vs_suppression", "Elicitation at step 0 vs suppression", chart_elicitation_vs_suppression),
    ("fixed_vs_mix", "Fixed-vs-mix gap", chart_fixed_vs_mix),
    ("score_curves", "Trait score over training", chart_score_curves),
    ("losses", "Training loss", chart_losses),
    ("heldout_logprob", "Held-out logprob over training", chart_heldout),
    ("em_rate", "Emergent-misalignment rate", chart_em),
    ("prediction", "Predicted vs observed: the selection heuristic against suppression", chart_prediction),
    ("heuristics", "Heuristics vs suppression", chart_heuristics),
    ("embeddings", "Prompt embeddings (PCA / SVD of W)", chart_embeddings),
    ("angles", "Angles between prompts", chart_angles),
    ("grad_cosine", "Activation-gradient cosine, defense on vs off", chart_grad_cosine),
    ("intensity", "Steering intensity sweep", chart_intensity),
    ("behaviour_matrix", "Behaviour matrix: starting model x post-finetuning data", chart_behaviour_matrix),
    ("behaviour_vs_none", "Behaviour matrix: effect vs no defense", chart_behaviour_vs_none),
]

BUNDLE = "vega-bundle.js"
PAGE_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; max-width: 1400px; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 13px; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: left; }
th { background: #f3f3f3; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
figure { margin: 1.5em 0 2.5em; }
figcaption { font-size: 13px; color: #555; }
.note { color: #8a5a00; }
"""


def _spec_js(spec: dict) -> str:
    return json.dumps(spec).replace("</", "<\\/")  # a spec must not close the <script> it sits in


def chart_page(title: str, spec: dict) -> str:
    return f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>{html.escape(title)}</title><script src="{BUNDLE}"></script></head>
<body><div id="chart"></div>
<script>vegaEmbed("#chart", {_spec_js(spec)}, {{"actions": false}}).catch(console.error);</script>
</body></html>
"""


def index_page(run: Run, tables: list[tuple[str, str, str]], charts: list[tuple[str, str, dict]], notes: list[str]) -> str:
    parts = [f"<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>raysweep report: {html.escape(run.name)}</title>",
             f"<style>{PAGE_CSS}</style><script src='{BUNDLE}'></script></head><body>",
             f"<h1>raysweep report: {html.escape(run.name)}</h1>"]
    if run.description:
        parts.append(f"<p>{html.escape(run.description)}</p>")
    prompts = run.trials["default_system_prompt"].drop_nulls() if "default_system_prompt" in run.trials.columns else []
    sysp = prompts[0] if len(prompts) else None
    parts.append("<p>Default condition = the model's template default" +
                 (f" (system prompt: <q>{html.escape(sysp)}</q>)" if sysp else "") + f". {html.escape(CI_NOTE)}.</p>")
    if notes:
        parts.append("<h2>Notes</h2><ul>" + "".join(f"<li class=note>{html.escape(n)}</li>" for n in notes) + "</ul>")
    parts.append("<h2>Summary tables</h2>")
    for title, caption, body in tables:
        parts.append(f"<h3>{html.escape(title)}</h3>" + (f"<p>{html.escape(caption)}</p>" if caption else "") + body)
    parts.append("<h2>Charts</h2>")
    for name, title, _ in charts:
        parts.append(f"<figure><figcaption>{html.escape(title)} — <a href='{name}.png'>PNG</a> · "
                     f"<a href='{name}.html'>HTML</a></figcaption><div id='{name}'></div></figure>")
    embeds = "\n".join(f"vegaEmbed('#{name}', {_spec_js(spec)}, {{'actions': false}}).catch(console.error);"
                       for name, _, spec in charts)
    parts.append(f"<script>\n{embeds}\n</script></body></html>\n")
    return "\n".join(parts)


def _vl_version() -> str:
    """The Vega-Lite version Altair writes, as vl-convert names it (e.g. v6.4)."""
    import altair as alt

    return "v" + ".".join(alt.VEGALITE_VERSION.split(".")[:2])


def write_bundle(out: Path) -> None:
    """vl-convert's bundle of Vega, Vega-Lite (the version Altair writes) and Vega-Embed.

    Bundling takes ~5 s, so it is kept in the raysweep cache, keyed by both versions.
    """
    import vl_convert as vlc

    from ..train.models import cache_dir
    from ..tables import write_text

    vl = _vl_version()
    cached = cache_dir() / "vega" / f"vega-bundle-vlc{getattr(vlc, '__version__', 'x')}-{vl}.js"
    if not cached.is_file():
        write_text(cached, vlc.javascript_bundle(vl_version=vl))
    write_text(out / BUNDLE, cached.read_text())


def build_report(where: str | Path, png: bool = True, out: str | Path | None = None) -> tuple[Path, list[str]]:
    """Draw the report of the experiment at `where` (its directory or URI, see load.py) into `out`,
    by default `<where>/report/`; returns (index path, failures). Charts without their tables are
    noted, not fatal. png=False skips the PNG export (about 1 s a chart); the HTML is always written.
    """
    from ..tables import write_text

    if out is None and is_uri(str(where)):
        raise ReportError(f"name a local directory for the report of {where} (out=...)")
    run = load_run(where)
    out = Path(where) / "report" if out is None else Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tables, failures = _tables(run)
    charts, notes, chart_failures = _charts(run, out, png)
    failures += chart_failures
    write_bundle(out)
    write_text(out / "index.html", index_page(run, tables, charts, notes + failures))
    return out / "index.html", failures


def _tables(run: Run) -> tuple[list[tuple[str, str, str]], list[str]]:
    """(title, caption, HTML) of each table the run supports; failures."""
    tables, failures = [], []
    for title, caption, build in TABLE_BUILDERS:
        try:
            tables.append((title, caption, html_table(build(run))))
        except Skip:
            continue  # an absent table needs no note: the charts' notes say what is missing
        except Exception as exc:  # a bug in one table must not cost the rest of the report
            failures.append(f"table '{title}' failed: {exc!r}")
            traceback.print_exc()
    return tables, failures


def _charts(run: Run, out: Path, png: bool) -> tuple[list[tuple[str, str, dict]], list[str], list[str]]:
    """Write each chart's page (and PNG); (name, title, spec) of those drawn, notes of those skipped, failures.
    A chart this run no longer supports must not survive from an earlier report: its files are deleted."""
    import vl_convert as vlc

    from ..tables import atomic_write_bytes, write_text

    charts, notes, failures = [], [], []
    for name, title, build in CHARTS:
        try:
            spec = build(run).to_dict()
            if png:
                atomic_write_bytes(out / f"{name}.png", vlc.vegalite_to_png(spec, scale=2, vl_version=_vl_version()))
        except Skip as why:
            notes.append(f"{title}: skipped — {why}")
            continue
        except Exception as exc:  # as for tables: report the failure, keep the other charts
            failures.append(f"chart '{name}' failed: {exc!r}")
            traceback.print_exc()
            continue
        write_text(out / f"{name}.html", chart_page(f"{run.name}: {title}", spec))
        charts.append((name, title, spec))
    drawn = {c[0] for c in charts}
    for name, _, _ in CHARTS:
        if name not in drawn:
            for stale in (out / f"{name}.png", out / f"{name}.html"):
                stale.unlink(missing_ok=True)
    return charts, notes, failures
