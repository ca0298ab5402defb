"""Shared fixtures and the test tiers.

Tiers (pytest -m NAME):
- `unit`: needs no model, no Ray, no subprocess and no server. Every test is `unit` unless it
  uses a heavy fixture (marked `@heavy`, see tiers.py; directly or through another fixture) or its module
  says `pytestmark = pytest.mark.integration`; those get `integration`. So a new test lands
  in the right tier by the fixtures it asks for, and a unit test that loads a model, starts
  a process or opens a server anyway fails at once with a message saying why (`_unit_guard`).
- `bf16`: every stage on the tiny model in bfloat16, compared with fp32 (tests/test_bf16.py).
- `slow`: the demo end to end.
"""

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests must never reach a hub
# The seeds' public data: tests read the build machine's copy next to the checkout as the
# data root when it is there; elsewhere the data root is $RAYSWEEP_DATA or its default, where
# `python -m raysweep.data fetch all` (scripts/setup.sh) put it. Tests needing data it lacks skip.
_COPY = Path(__file__).resolve().parents[2] / "shared" / "data"
if _COPY.is_dir():
    os.environ.setdefault("RAYSWEEP_DATA", str(_COPY))

import pytest

from tiers import HEAVY_FIXTURES, heavy


def pytest_collection_modifyitems(config, items):
    for item in items:
        is_heavy = item.get_closest_marker("integration") or HEAVY_FIXTURES.intersection(item.fixturenames)
        item.add_marker(pytest.mark.integration if is_heavy else pytest.mark.unit)


class NotAUnitTest(RuntimeError):
    pass


@pytest.fixture(autouse=True)
def _unit_guard(request, monkeypatch):
    """Fail a unit-tier test that loads a model, spawns a process or opens a server."""
    if request.node.get_closest_marker("unit") is None:
        yield
        return
    import socket
    import subprocess

    def refuse(what):
        def _refuse(*args, **kwargs):
            raise NotAUnitTest(
                f"{request.node.nodeid} {what}: a unit test must not; use one of the fixtures "
                f"{sorted(HEAVY_FIXTURES)} or mark the module `pytestmark = pytest.mark.integration`")
        return _refuse

    monkeypatch.setattr(subprocess.Popen, "__init__", refuse("starts a process"))
    monkeypatch.setattr(socket.socket, "listen", refuse("opens a server socket"))
    try:
        from transformers.modeling_utils import PreTrainedModel
    except ImportError:
        pass
    else:
        monkeypatch.setattr(PreTrainedModel, "__init__", refuse("builds a model"))
    yield


@pytest.fixture(scope="session", autouse=True)
def _torch_threads():
    """One torch thread, as trials use (RAYSWEEP_THREADS): oversubscribed cores slow forwards several-fold."""
    import torch

    torch.set_num_threads(int(os.environ.get("RAYSWEEP_THREADS", "1")))


@heavy
@pytest.fixture(scope="session")
def smollm2():
    """(model, tokenizer) of the embedded SmolLM2-135M-Instruct, fp32 on CPU."""
    from raysweep.train.models import load_model

    return load_model("smollm2-135m-instruct")


@heavy
@pytest.fixture(scope="session")
def tiny():
    """(model, tokenizer) of the seeded random 2-layer Llama with the SmolLM2 tokenizer."""
    from raysweep.train.models import load_model

    return load_model("tiny-random")


@heavy
@pytest.fixture(scope="session")
def ray_local():
    """One real local Ray for the whole test session (loopback, no dashboard)."""
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray

    from raysweep.train.models import resolve_model

    resolve_model("tiny-random")  # build the cache once, before trials race for it
    ray.init(address="local", num_cpus=2, include_dashboard=False, configure_logging=False)
    yield ray
    ray.shutdown()
