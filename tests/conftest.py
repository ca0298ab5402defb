"""Shared fixtures: the real SmolLM2 model (converted once into the cache) and a tiny random one."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests must never reach a hub

import pytest


@pytest.fixture(scope="session", autouse=True)
def _torch_threads():
    """One torch thread, as trials use (RAYSWEEP_THREADS): oversubscribed cores slow forwards several-fold."""
    import torch

    torch.set_num_threads(int(os.environ.get("RAYSWEEP_THREADS", "1")))


@pytest.fixture(scope="session")
def smollm2():
    """(model, tokenizer) of the embedded SmolLM2-135M-Instruct, fp32 on CPU."""
    from raysweep.models import load_model

    return load_model("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def tiny():
    """(model, tokenizer) of the seeded random 2-layer Llama with the SmolLM2 tokenizer."""
    from raysweep.models import load_model

    return load_model("tiny-random")


@pytest.fixture(scope="session")
def ray_local():
    """One real local Ray for the whole test session (loopback, no dashboard)."""
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray

    from raysweep.models import resolve_model

    resolve_model("tiny-random")  # build the cache once, before trials race for it
    ray.init(address="local", num_cpus=2, include_dashboard=False, configure_logging=False)
    yield ray
    ray.shutdown()
