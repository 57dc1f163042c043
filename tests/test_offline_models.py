"""The offline model builders: the tiny chat model builds, its tokenizer round-trips, its chat template renders.

Needs torch, transformers and tokenizers (the vLLM CPU venv has them); no vLLM, no network. ~10 s.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from vllama import offline_models as om

pytest.importorskip("torch")
pytest.importorskip("tokenizers")
transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return om.build_tiny_chat_model(tmp_path_factory.mktemp("models") / "tiny-chat")


def test_package_imports_without_heavy_deps() -> None:
    code = (
        "import sys, vllama.offline_models\n"
        "heavy = {'torch', 'transformers', 'tokenizers'} & set(sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_tiny_model_files(tiny: Path) -> None:
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", om.MARKER):
        assert (tiny / name).is_file(), name
    config = json.loads((tiny / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["hidden_size"] == 128 and config["num_hidden_layers"] == 2
    assert config["head_dim"] >= 32  # vLLM's CPU attention needs it
    assert config["max_position_embeddings"] == 2048
    tok_config = json.loads((tiny / "tokenizer_config.json").read_text())
    assert tok_config["tokenizer_class"] == "PreTrainedTokenizerFast"  # loadable by transformers 4.x too
    assert "<|im_start|>" in tok_config["chat_template"]


def test_tiny_tokenizer_round_trips(tiny: Path) -> None:
    tok = transformers.AutoTokenizer.from_pretrained(tiny)
    config = json.loads((tiny / "config.json").read_text())
    assert 1000 <= len(tok) == config["vocab_size"] <= 2000
    assert tok.eos_token == "<|im_end|>" and tok.eos_token_id == config["eos_token_id"]
    assert tok.bos_token is not None and tok.pad_token is not None
    for text in ["Hello, world!", "The capital of France is Paris.", "naïve café — 東京 🙂", "def f(x):\n\treturn x"]:
        ids = tok.encode(text, add_special_tokens=False)
        assert ids and max(ids) < len(tok)
        assert tok.decode(ids) == text
    # special tokens are single tokens, not split into bytes
    assert tok.encode("<|im_start|>user<|im_end|>", add_special_tokens=False)[0] == tok.convert_tokens_to_ids(
        "<|im_start|>"
    )


def test_tiny_chat_template_renders(tiny: Path) -> None:
    tok = transformers.AutoTokenizer.from_pretrained(tiny)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    expected = "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\n"
    assert text == expected
    no_prompt = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
    assert no_prompt.endswith("Hi!<|im_end|>\n")
    # OpenAI-style content parts render like plain strings
    parts = [{"role": "user", "content": [{"type": "text", "text": "Hi"}, {"type": "text", "text": "!"}]}]
    assert tok.apply_chat_template(parts, tokenize=False) == "<|im_start|>user\nHi!<|im_end|>\n"


def test_tiny_build_is_idempotent(tiny: Path) -> None:
    before = (tiny / "model.safetensors").stat().st_mtime_ns
    assert om.build_tiny_chat_model(tiny) == tiny
    assert (tiny / "model.safetensors").stat().st_mtime_ns == before
    assert not [p for p in tiny.parent.iterdir() if ".building-" in p.name]


def test_build_refuses_foreign_folder(tmp_path: Path) -> None:
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "keep.txt").write_text("not ours")
    with pytest.raises(FileExistsError):
        om.build_tiny_chat_model(tmp_path / "x")
    assert (tmp_path / "x" / "keep.txt").read_text() == "not ours"


def test_prepare_rejects_unknown_names(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown offline model"):
        om.prepare(tmp_path, ["tiny", "gpt-5"])
    assert not any(tmp_path.iterdir())


def test_tiny_lora_adapter_is_peft_and_fits_the_tiny_model(tiny: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    folder = om.build_tiny_lora(tmp_path / "lora", seed=1)
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 8 and config["target_modules"] == ["q_proj", "v_proj"]
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    assert len(tensors) == 2 * 2 * 2  # layers × (q, v) × (A, B)
    model = json.loads((tiny / "config.json").read_text())
    a = tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"]
    b = tensors["base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"]
    assert tuple(a.shape) == (8, model["hidden_size"])
    assert tuple(b.shape) == (model["num_key_value_heads"] * model["head_dim"], 8)
    assert float(b.abs().sum()) > 0  # not PEFT's zero init: the adapter changes the answers
    # idempotent for the same seed and rank; another seed or rank builds other weights
    before = (folder / "adapter_model.safetensors").read_bytes()
    assert om.build_tiny_lora(folder, seed=1).samefile(folder)
    assert (folder / "adapter_model.safetensors").read_bytes() == before
    om.build_tiny_lora(folder, seed=2, rank=16)
    assert json.loads((folder / "adapter_config.json").read_text())["r"] == 16
    assert (folder / "adapter_model.safetensors").read_bytes() != before
