"""Tests for raysweep.models: the embedded-model cache, loading, templates, layers."""

import json
import threading
import time
from pathlib import Path

import pytest

from raysweep import models
from raysweep.generation import generate

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
