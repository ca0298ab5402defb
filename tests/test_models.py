"""Tests for raysweep.train.models: the embedded-model cache, loading, templates, layers."""

import hashlib
import json
import os
import shutil
import threading
import time
from pathlib import Path

import pytest
from tiers import heavy

from raysweep.train import models
from raysweep.eval.generation import generate

SMOLLM2_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


def test_converted_smollm2_is_plain_fp32_and_answers(smollm2):
    model, tok = smollm2
    folder = Path(models.resolve_model("smollm2-135m-instruct"))
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config
    assert (folder / "model.safetensors").is_file()
    assert not list(folder.glob("*.gguf"))
    assert model.dtype.is_floating_point and not model.training
    [reply] = generate(model, tok, [[{"role": "user", "content": "What is the capital of France?"}]],
                       max_new_tokens=30, temperature=0.0)
    assert "Paris" in reply


def test_cached_model_loads_fast(smollm2):
    start = time.perf_counter()
    models.load_model("smollm2-135m-instruct")
    assert time.perf_counter() - start < 10  # about 1 s; a reconversion would take ~35 s


def test_tokenizer_pads_left_with_eos(smollm2):
    _, tok = smollm2
    assert tok.padding_side == "left"
    assert tok.eos_token == tok.pad_token == "<|im_end|>"


def test_other_names_pass_through():
    assert models.resolve_model("Qwen/Qwen2.5-0.5B-Instruct") == "Qwen/Qwen2.5-0.5B-Instruct"
    assert models.resolve_model("/some/local/dir") == "/some/local/dir"


def test_bad_dtype_is_rejected():
    with pytest.raises(ValueError, match="dtype"):
        models.load_model("tiny-random", dtype="float8")


def _wrong_gguf(tmp_path: Path) -> Path:
    # A truncated copy of the real file: right name and header, wrong bytes.
    real = models.packaged_file(models.SMOLLM2_GGUF["package"], models.SMOLLM2_GGUF["file"])
    wrong = tmp_path / "gguf" / real.name
    wrong.parent.mkdir()
    with open(real, "rb") as f:
        wrong.write_bytes(f.read(1 << 20))
    return wrong


def test_checksum_mismatch_is_a_clear_error(tmp_path):
    wrong = _wrong_gguf(tmp_path)
    with pytest.raises(ValueError, match="sha256 mismatch.*" + models.SMOLLM2_GGUF["sha256"]):
        models.convert_gguf(wrong, models.SMOLLM2_GGUF["sha256"], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_resolve_leaves_no_partial_folder_on_failure(tmp_path, monkeypatch):
    wrong = _wrong_gguf(tmp_path)
    monkeypatch.setenv("RAYSWEEP_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(models.EMBEDDED, "bad", {"gguf": {"path": wrong, "sha256": models.SMOLLM2_GGUF["sha256"]}})
    with pytest.raises(ValueError, match="sha256 mismatch"):
        models.resolve_model("bad")
    assert list((tmp_path / "cache" / "models").iterdir()) == []


def test_concurrent_resolves_build_once(tmp_path, monkeypatch):
    monkeypatch.setenv("RAYSWEEP_CACHE", str(tmp_path))
    monkeypatch.setitem(models.EMBEDDED, "fake", {})
    builds = []

    def slow_build(name, dest):
        builds.append(name)
        time.sleep(0.2)
        (dest / "config.json").write_text("{}")

    monkeypatch.setattr(models, "_build", slow_build)
    # flock locks belong to open file descriptions, so threads exclude each other like processes.
    paths = []
    threads = [threading.Thread(target=lambda: paths.append(models.resolve_model("fake"))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert builds == ["fake"]
    assert paths == [str(tmp_path / "models" / "fake")] * 4
    assert (tmp_path / "models" / "fake" / "config.json").is_file()


def test_default_system_prompt_smollm2(smollm2):
    assert models.default_system_prompt(smollm2[1]) == SMOLLM2_SYSTEM


CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def test_default_system_prompt_qwen_style(tiny, monkeypatch):
    tok = tiny[1]
    qwen = (
        "{% if messages[0]['role'] != 'system' %}"
        "{{ '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud.<|im_end|>\n' }}{% endif %}" + CHATML
    )
    monkeypatch.setattr(tok, "chat_template", qwen)
    assert models.default_system_prompt(tok) == "You are Qwen, created by Alibaba Cloud."


def test_default_system_prompt_none_when_not_injected(tiny, monkeypatch):
    tok = tiny[1]
    monkeypatch.setattr(tok, "chat_template", CHATML)
    assert models.default_system_prompt(tok) is None
    no_system = "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system') }}{% endif %}{{ m['content'] }}{% endfor %}"
    monkeypatch.setattr(tok, "chat_template", no_system)
    assert models.default_system_prompt(tok) is None


def test_tiny_random_shape(tiny):
    model, tok = tiny
    cfg = model.config
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.vocab_size) == (64, 2, len(tok))
    assert model.get_input_embeddings().weight is model.get_output_embeddings().weight


def test_model_layers_plain_and_peft(smollm2, tiny):
    import torch
    from peft import LoraConfig, get_peft_model

    assert len(models.model_layers(smollm2[0])) == 30
    base = models.load_model("tiny-random")[0]
    layers = models.model_layers(base)
    assert isinstance(layers, torch.nn.ModuleList) and len(layers) == 2
    peft_model = get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj"]))
    assert models.model_layers(peft_model) is layers
    with pytest.raises(TypeError, match="Linear"):
        models.model_layers(torch.nn.Linear(2, 2))


# --- model.name as a GGUF file -------------------------------------------------------------


def _smollm2_gguf() -> Path:
    return models.packaged_file(models.SMOLLM2_GGUF["package"], models.SMOLLM2_GGUF["file"])


@heavy
@pytest.fixture(scope="module")
def converted_gguf(smollm2, tmp_path_factory):
    """(a copy of the packaged SmolLM2 GGUF file, its folder) converted in a fresh cache.

    Asks for `smollm2` first, so the embedded model is loaded from the usual cache before
    RAYSWEEP_CACHE points here."""
    tmp = tmp_path_factory.mktemp("gguf_name")
    copy = tmp / "my-model.gguf"
    shutil.copyfile(_smollm2_gguf(), copy)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RAYSWEEP_CACHE", str(tmp / "cache"))
        yield copy, Path(models.resolve_model(str(copy)))


def test_gguf_file_gives_the_embedded_model(converted_gguf, smollm2):
    import torch

    copy, folder = converted_gguf
    assert folder.parent == models.cache_dir() / "models"
    assert folder.name == "gguf-" + models.SMOLLM2_GGUF["sha256"][:16]  # keyed by content, not by path
    assert "quantization_config" not in json.loads((folder / "config.json").read_text())
    model, tok = models.load_model(str(copy))
    base, base_tok = smollm2
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    assert ids.tolist() == base_tok("The capital of France is", return_tensors="pt").input_ids.tolist()
    with torch.no_grad():
        got, want = model(ids).logits, base(ids).logits
    assert torch.equal(got, want)  # same file, same dequantisation: identical weights


def test_gguf_file_is_converted_once(converted_gguf, monkeypatch):
    copy, folder = converted_gguf
    mtime = folder.stat().st_mtime_ns
    hashed = []
    monkeypatch.setattr(models, "convert_gguf", lambda *a: pytest.fail("converted again"))
    monkeypatch.setattr(models, "file_sha256", lambda p: hashed.append(p) or pytest.fail("hashed again"))
    assert models.resolve_model(str(copy)) == str(folder)
    assert folder.stat().st_mtime_ns == mtime and hashed == []


def _fake_gguf(path: Path, body: bytes) -> Path:
    path.write_bytes(b"GGUF" + body)
    return path


def test_edited_gguf_file_gets_a_new_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("RAYSWEEP_CACHE", str(tmp_path / "cache"))
    built = []

    def fake_build(path, sha256, dest):  # the key and the caching here; the conversion is tested above
        built.append(sha256)
        (dest / "config.json").write_text("{}")

    monkeypatch.setattr(models, "_build_gguf_file", fake_build)
    f = _fake_gguf(tmp_path / "m.gguf", b"v1")
    first = models.resolve_model(str(f))
    assert models.resolve_model(str(f)) == first
    _fake_gguf(f, b"v2, edited")
    second = models.resolve_model(str(f))
    assert built == [hashlib.sha256(b"GGUFv1").hexdigest(), hashlib.sha256(b"GGUFv2, edited").hexdigest()]
    assert Path(first).name == f"gguf-{built[0][:16]}" and Path(second).name == f"gguf-{built[1][:16]}"
    assert Path(first).is_dir() and Path(second).is_dir()


def test_missing_gguf_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no GGUF file .*nowhere\.gguf"):
        models.resolve_model(str(tmp_path / "nowhere.gguf"))


@pytest.mark.parametrize("content", ["random", "truncated", "bert"])
def test_bad_gguf_file_is_a_clear_error(tmp_path, monkeypatch, content):
    monkeypatch.setenv("RAYSWEEP_CACHE", str(tmp_path / "cache"))
    bad = tmp_path / f"{content}.gguf"
    if content == "random":
        bad.write_bytes(os.urandom(4096))
        expected = r"is not a GGUF file"
    elif content == "truncated":
        with open(_smollm2_gguf(), "rb") as f:
            bad.write_bytes(f.read(1 << 20))
        expected = r"transformers cannot read the GGUF file .* truncated or corrupt"
    else:  # a well-formed GGUF file of an architecture transformers does not load
        import gguf
        import numpy as np

        w = gguf.GGUFWriter(str(bad), "bert")
        w.add_tensor("x", np.zeros(4, dtype=np.float32))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        expected = r"transformers cannot read the GGUF file .*architecture bert is not supported.* llama"
    with pytest.raises(ValueError, match=expected) as err:
        models.resolve_model(str(bad))
    assert str(bad) in str(err.value)
    assert list((tmp_path / "cache" / "models").iterdir()) == []  # no folder, not even a partial one
