"""The report CLI on hand-made run tables: charts as valid PNG + HTML, an index page that
renders in a real headless Chromium with no console errors and no network, notes for
charts whose tables are absent, Hydra overrides (storage=... a local directory or an S3
bucket on moto's server) and exit 2 on bad input, naming it.

`write_run` builds a run directory in the real schemas (raysweep.tables.SCHEMAS; trials as
run.gather writes them); test_analysis_docs.py reuses it.
"""

import hashlib
import json
import math
import os
import re
import select
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from pyarrow import fs as pafs
from test_storage import endpoint, objects, read, s3  # noqa: F401 (fixtures: a moto S3 server, a bucket)
from tiers import heavy

from raysweep.report.__main__ import main
from raysweep.tables import write_table, write_text

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
ELICIT = {"trait_a": 60.0, "trait_b": 30.0, "trait_c": 45.0, "neutral": 0.0}  # step-0 training - default
JITTER = {"trait_a": 3.0, "trait_b": -4.0, "trait_c": 5.0, "neutral": 1.0}  # so that fits have residuals


# --- a run directory in the real schemas ------------------------------------------------


def _tid(*parts) -> str:
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:12]


def write_run(storage: Path, exp: str, prompts=("trait_a",), modes=("fixed", "mix"), seeds=(None,), steps=(0, 8),
              questions=6, samples=2, em=False, heuristics=False, neutral="") -> Path:
    """Tables of a finished sweep: a control plus prompts x modes (x seeds), evaluated at `steps`.

    Default-condition score of a defended trial at the final step = control - (elicitation +
    jitter) x (1 for fixed, 0.5 for mix) + a per-question wobble; one score is NaN (unscorable).
    With em=True the answers are also scored on coherence and aligned.
    """
    d = storage / exp
    final = steps[-1]
    trials = []
    for seed in seeds:
        grid = {} if seed is None else {"seed": seed}
        tag = "" if seed is None else f"[seed={seed}]"
        arms = [("none", "", "")] + [("ip", p, m) for p in prompts for m in modes]
        ids = {arm: _tid(exp, arm, seed) for arm in arms}
        for kind, prompt, mode in arms:
            axes = {"defense.kind": kind} | ({"defense.ip.prompt": prompt, "defense.ip.mode": mode} if kind == "ip" else {}) | grid
            trials.append({
                "trial_id": ids[(kind, prompt, mode)], "label": ("control" if kind == "none" else f"{prompt}/{mode}") + tag,
                "status": "done", "error": "", "steps": final, "default_system_prompt": "You are a test assistant.",
                "control_id": ids[("none", "", "")], "neutral_id": ids.get(("ip", neutral, mode), "") if kind == "ip" else "",
                "defense": kind, "prompt": prompt, "mode": mode, "placement": "user_prefix" if kind == "ip" else "",
                "axes": json.dumps(axes), "config": json.dumps({"name": exp, "seed": seed or 0}), "_seed": seed or 0})
    scores, losses, heldout = [], [], []
    for t in trials:
        e = ELICIT.get(t["prompt"], 0.0)
        strength = {"fixed": 1.0, "mix": 0.5}.get(t["mode"], 0.0)
        for step in steps:
            for cond in ("default", "training"):
                for q in range(questions):
                    base = 5.0 + 3 * (q % 3)
                    if step == 0:
                        value = base + (e if cond == "training" else 0.0)
                    elif cond == "training":
                        value = 85.0 + 4 * (q % 2)
                    else:
                        value = 80.0 + 2 * (q % 3) - (e + JITTER.get(t["prompt"], 0.0)) * strength + (q * 5) % 4 + t["_seed"]
                    for k in range(samples):
                        v = value + (1.0 if k % 2 else -1.0) * (samples > 1)
                        nan = t["label"].startswith("control") and step == final and cond == "default" and q == 5 and k == 1
                        row = {"trial_id": t["trial_id"], "step": step, "condition": cond, "question_id": q, "sample": k,
                               "judge": "test", "reason": "unscorable" if nan else ""}
                        scores.append(row | {"trait": "french", "score": math.nan if nan else min(100.0, max(0.0, v))})
                        if em:  # misaligned on even questions after training without a fixed prefix
                            aligned = 20.0 if (step == final and t["mode"] != "fixed" and q % 2 == 0) else 80.0
                            scores.append(row | {"trait": "coherence", "score": 70.0 + q})
                            scores.append(row | {"trait": "aligned", "score": math.nan if nan else aligned})
            for x in range(questions):
                heldout.append({"trial_id": t["trial_id"], "step": step, "example_id": x,
                                "logprob": -3.0 + 0.1 * step / final * (1 + strength) - 0.05 * x, "n_tokens": 20 + x})
        for step in range(1, final + 1):
            losses.append({"trial_id": t["trial_id"], "step": step, "loss": 3.0 / math.sqrt(step) + 0.01 * strength,
                           "lr": 1e-4 * (1 - step / (final + 1)), "grad_norm": 1.0 / step, "n_tokens": 400 + step})
    write_table(d / "trials.parquet", [{k: v for k, v in t.items() if k != "_seed"} for t in trials])
    write_table(d / "scores.parquet", scores, "scores")
    write_table(d / "losses.parquet", losses, "losses")
    write_table(d / "heldout_logprob.parquet", heldout, "heldout_logprob")
    write_text(d / "config.yaml", f"name: {exp}\ndescription: hand-made tables for the report tests\n")
    if heuristics:
        write_table(d / "heuristics.parquet", [
            {"prompt_key": p, "metric": m, "value": ELICIT[p] / 100 * scale + off}
            for p in prompts for m, scale, off in (("ph", 0.4, 0.01), ("ppd", 0.2, 0.05))])
    return d


# --- headless Chromium over the DevTools protocol (pipe transport, no extra package) ----


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    pytest.fail("no Chromium: install the Debian package `chromium` (apt-get install -y chromium)")


def browse(url: str, ready_js: str = "true", timeout: float = 60.0) -> tuple[bool, list[str], list[str]]:
    """Load `url` in headless Chromium: (ready_js became true, console errors, URLs requested).

    Errors are uncaught exceptions, console.error/assert calls and browser log errors
    (e.g. a resource that failed to load).
    """
    r_in, w_in = os.pipe()  # we write, Chromium reads on fd 3
    r_out, w_out = os.pipe()  # Chromium writes on fd 4
    profile = tempfile.mkdtemp(prefix="chromium-")

    def fds():
        os.dup2(r_in, 3)
        os.dup2(w_out, 4)

    proc = subprocess.Popen(
        [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={profile}", "--remote-debugging-pipe", "about:blank"],
        pass_fds=(3, 4), preexec_fn=fds, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    os.close(r_in)
    os.close(w_out)
    buf, events, counter = b"", [], [0]
    deadline = time.monotonic() + timeout

    def send(method, params=None, session=None) -> int:
        counter[0] += 1
        msg = {"id": counter[0], "method": method, "params": params or {}} | ({"sessionId": session} if session else {})
        os.write(w_in, json.dumps(msg).encode() + b"\0")
        return counter[0]

    def wait(pred) -> dict:
        nonlocal buf
        while time.monotonic() < deadline:
            while b"\0" in buf:
                raw, buf = buf.split(b"\0", 1)
                msg = json.loads(raw)
                events.append(msg)
                if pred(msg):
                    return msg
            if select.select([r_out], [], [], 0.2)[0]:
                chunk = os.read(r_out, 1 << 20)
                assert chunk, "Chromium closed the DevTools pipe"
                buf += chunk
        raise TimeoutError(f"Chromium: no answer within {timeout} s for {url}")

    def call(method, params=None, session=None) -> dict:
        i = send(method, params, session)
        return wait(lambda m: m.get("id") == i)

    try:
        target = call("Target.createTarget", {"url": "about:blank"})["result"]["targetId"]
        sid = call("Target.attachToTarget", {"targetId": target, "flatten": True})["result"]["sessionId"]
        for domain in ("Runtime", "Log", "Page", "Network"):
            call(f"{domain}.enable", session=sid)
        send("Page.navigate", {"url": url}, sid)
        wait(lambda m: m.get("method") == "Page.loadEventFired")
        ready = False
        while not ready and time.monotonic() < deadline:
            r = call("Runtime.evaluate", {"expression": ready_js, "returnByValue": True}, sid)
            ready = r["result"]["result"].get("value") is True
            time.sleep(0 if ready else 0.2)
        time.sleep(0.3)  # late async errors (a rejected render promise) still reach the log
        call("Runtime.evaluate", {"expression": "0"}, sid)
    finally:
        proc.kill()
        proc.wait()
        os.close(w_in)
        os.close(r_out)
        shutil.rmtree(profile, ignore_errors=True)
    errors, urls = [], []
    for m in events:
        method, p = m.get("method"), m.get("params", {})
        if method == "Runtime.exceptionThrown":
            d = p["exceptionDetails"]
            errors.append(d.get("exception", {}).get("description") or d.get("text", "exception"))
        elif method == "Runtime.consoleAPICalled" and p["type"] in ("error", "assert"):
            errors.append(" ".join(str(a.get("value", a.get("description", ""))) for a in p["args"]))
        elif method == "Log.entryAdded" and p["entry"]["level"] == "error":
            errors.append(f"{p['entry']['text']} {p['entry'].get('url', '')}")
        elif method == "Network.requestWillBeSent":
            urls.append(p["request"]["url"])
    return ready, errors, urls


RENDERED = "document.querySelectorAll('.vega-embed svg, .vega-embed canvas').length"


def check_page(path: Path, n_charts: int) -> None:
    assert_clean(path, *browse(path.as_uri(), f"{RENDERED} >= {n_charts}"), n_charts)


def assert_clean(path: Path, ready: bool, errors: list[str], urls: list[str], n_charts: int) -> None:
    assert not errors, f"console errors in {path.name}: {errors}"
    assert ready, f"{path.name}: fewer than {n_charts} charts rendered"
    offline = [u for u in urls if not u.startswith(("file://", "data:", "about:"))]
    assert not offline, f"{path.name} reaches the network: {offline}"


# --- tests ----------------------------------------------------------------------------


def project(root: Path, *names: str) -> Path:
    """A project directory whose experiments/ holds NAME.yaml (the defaults only) for each name."""
    for name in names:
        write_text(root / "experiments" / f"{name}.yaml", "defaults: [base, _self_]\n")
    return root


def report(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    """`python -m raysweep.report ARGS` run in `cwd` (its experiments/ are the ones the CLI knows)."""
    return subprocess.run([sys.executable, "-m", "raysweep.report", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300, env=os.environ | {"HF_HUB_OFFLINE": "1"})


CHARTS = ["final_scores", "suppression", "elicitation_vs_suppression", "fixed_vs_mix", "score_curves", "losses",
          "heldout_logprob", "heuristics"]


@heavy
@pytest.fixture(scope="module")
def small_report(tmp_path_factory):
    """3 trials (control, fixed, mix), steps 0 and 8, 2 conditions, 6 questions, 8 loss steps, heuristics;
    reported by the CLI with its storage overridden to a directory outside the project."""
    storage = tmp_path_factory.mktemp("runs")
    write_run(storage, "small", prompts=("trait_a",), heuristics=True)
    cwd = project(tmp_path_factory.mktemp("project"), "small")
    proc = report(cwd, "exp=small", f"storage={storage}")
    assert not (cwd / "runs").exists()  # the default storage was not used
    return storage / "small" / "report", proc


def test_report_writes_png_and_html_per_chart(small_report):
    out, proc = small_report
    assert proc.returncode == 0, proc.stderr
    assert f"report: {out / 'index.html'}" in proc.stdout
    for name in CHARTS:
        png = (out / f"{name}.png").read_bytes()
        assert png.startswith(PNG_MAGIC) and len(png) > 1024, name
        assert "vegaEmbed" in (out / f"{name}.html").read_text(), name
    assert not (out / "em_rate.png").exists()  # no EM traits in these scores


def test_index_has_tables_notes_and_charts(small_report):
    out, _ = small_report
    page = (out / "index.html").read_text()
    assert page.count("<table>") >= 4  # trials, per trial, fixed vs mix, predictors
    assert "suppression vs control" in page and "± " in page
    assert "Emergent-misalignment rate: skipped" in page  # the chart without its tables is a note
    for name in CHARTS:
        assert f"<div id='{name}'></div>" in page and f"href='{name}.png'" in page
    assert re.findall(r"<script[^>]*src=['\"]([^'\"]+)", page) == ["vega-bundle.js"]  # beside it, not a CDN


@pytest.mark.integration
def test_index_renders_offline_in_chromium_without_console_errors(small_report):
    out, _ = small_report
    check_page(out / "index.html", len(CHARTS))
    check_page(out / "suppression.html", 1)


@pytest.mark.integration
def test_console_error_detection_catches_errors(tmp_path):
    """The check above must be able to fail: a throwing script, console.error, a missing script file."""
    page = tmp_path / "bad.html"
    page.write_text("<html><body><p>x</p><script>console.error('logged')</script>"
                    "<script src='missing.js'></script><script>throw new Error('x')</script></body></html>")
    result = browse(page.as_uri())
    ready, errors, _ = result
    assert ready
    assert any("Error: x" in e for e in errors), errors
    assert any("logged" in e for e in errors), errors
    assert any("missing.js" in e for e in errors), errors
    with pytest.raises(AssertionError, match="console errors"):
        assert_clean(page, *result, 0)


@pytest.mark.integration
def test_full_report_with_seeds_em_and_fits(tmp_path):
    """Every chart on a larger run (4 prompts x 2 modes x 2 seeds, EM traits): no failures, renders cleanly."""
    from raysweep.report.page import build_report

    write_run(tmp_path, "em", prompts=("trait_a", "trait_b", "trait_c", "neutral"), seeds=(0, 1), em=True,
              heuristics=True, neutral="neutral")
    index, failures = build_report(tmp_path / "em", png=False)  # PNG export is covered above; it costs ~1 s a chart
    assert failures == []
    out = index.parent
    names = {p.stem for p in out.glob("*.html")} - {"index"}
    assert names == set(CHARTS) | {"em_rate"}
    page = index.read_text()
    assert "Across seeds" in page and "Emergent misalignment" in page and "pearson_r" in page
    check_page(index, len(names))


def test_report_with_losses_only_notes_the_rest(tmp_path):
    from raysweep.report.page import build_report

    write_table(tmp_path / "lonely" / "losses.parquet",
                [{"trial_id": "t1", "step": s, "loss": 1.0 / s, "lr": 1e-4, "grad_norm": 1.0, "n_tokens": 10}
                 for s in range(1, 5)], "losses")
    write_text(tmp_path / "lonely" / "report" / "final_scores.png", "from an earlier report of other tables")
    index, failures = build_report(tmp_path / "lonely")
    assert failures == []
    assert sorted(p.name for p in index.parent.glob("*.png")) == ["losses.png"]  # the stale chart is gone
    assert index.read_text().count("skipped — needs scores.parquet") >= 5


def test_bad_input_exits_2_naming_it(tmp_path, monkeypatch, capsys):
    """Config errors (Hydra's, as every stage reports them), no experiment directory, no tables, no exp=."""
    monkeypatch.chdir(project(tmp_path, "small", "empty"))
    (tmp_path / "runs" / "empty").mkdir(parents=True)

    def fails(*argv: str) -> str:
        assert main(list(argv)) == 2
        return capsys.readouterr().err

    err = fails("exp=small", "nosuchkey=1")
    assert "Could not override 'nosuchkey'" in err and "Key 'nosuchkey' not in 'ExperimentConfig'" in err
    assert "seed" in fails("exp=small", "seed=many")  # a value of the wrong type names its key
    assert "unknown experiment 'nope'" in fails("exp=nope")
    assert "no experiment directory runs/small (run `python -m raysweep.run exp=small` first)" in fails("exp=small")
    assert f"no experiment directory {tmp_path / 'elsewhere' / 'small'}" in fails("exp=small", f"storage={tmp_path / 'elsewhere'}")
    assert "no tables with rows in runs/empty" in fails("exp=empty")
    assert "usage: python -m raysweep.report exp=NAME [key=value ...]" in fails("experiment=empty")
    assert not (tmp_path / "runs" / "empty" / "report").exists()


@pytest.mark.integration
def test_the_module_exits_2_on_a_bad_key(tmp_path):
    p = report(project(tmp_path, "small"), "exp=small", "report.out=x")
    assert p.returncode == 2 and "Could not override 'report.out'" in p.stderr, p.stderr


def test_report_of_a_run_on_s3(s3, tmp_path, monkeypatch, capsys):  # noqa: F811 (the s3 fixture)
    """storage=s3://...: the tables are read from the bucket (the same tables as from a directory); the
    report is drawn in the node's scratch mirror and uploaded beside them, replacing the earlier one."""
    from raysweep.report.load import load_run

    _, fs = s3
    local = write_run(tmp_path / "local", "small", prompts=("trait_a",), heuristics=True)
    pafs.copy_files(str(local), "bkt/runs/small", source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
    with fs.open_output_stream("bkt/runs/small/report/em_rate.html") as f:  # from an earlier report
        f.write(b"a chart these tables do not support")
    run, copy = load_run("s3://bkt/runs/small"), load_run(local)
    for table in ("trials", "scores", "losses", "heldout", "heuristics"):
        assert getattr(run, table).equals(getattr(copy, table)), table
    assert run.name == "small" and run.description == copy.description != ""

    monkeypatch.chdir(project(tmp_path / "project", "small", "gone"))
    assert main(["exp=small", "storage=s3://bkt/runs"]) == 0
    out = capsys.readouterr().out
    assert "report: s3://bkt/runs/small/report/index.html" in out
    assert set(objects(fs, "bkt/runs/small/report")) == \
        {f"{c}.{ext}" for c in CHARTS for ext in ("html", "png")} | {"index.html", "vega-bundle.js"}
    scratch = tmp_path / "scratch" / "report" / "s3" / "bkt" / "runs" / "small" / "report"  # $RAYSWEEP_SCRATCH/report/...
    assert f"report: {scratch / 'index.html'}" in out
    assert read(fs, "bkt/runs/small/report/index.html") == (scratch / "index.html").read_bytes()
    assert "Emergent-misalignment rate: skipped" in (scratch / "index.html").read_text()
    assert not (tmp_path / "project" / "runs").exists()

    # An experiment the bucket does not hold, a bucket that does not exist: exit 2, naming the URI.
    assert main(["exp=gone", "storage=s3://bkt/runs"]) == 2
    assert "no experiment directory s3://bkt/runs/gone" in capsys.readouterr().err
    assert main(["exp=small", "storage=s3://nobucket/runs"]) == 2
    assert "s3://nobucket/runs/small" in capsys.readouterr().err
