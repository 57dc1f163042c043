"""Memory auto-sizing: what a model needs on each device, computed from its checkpoint, and the vLLM flags that
make vLLM take exactly that instead of a fixed fraction of the GPU. Pure functions over config.json and file
sizes; no I/O beyond reading the model folder.

    need = CUDA context + weights + KV cache + activations + overhead         (bytes, per device)

- weights: the checkpoint's `*.safetensors` files (or the index's `total_size`; `.bin`/`.pt` otherwise), halved
  when a float32 checkpoint is served in 16 bits; without files, the parameter count from config.json × the
  dtype's size. Divided by the tensor-parallel size.
- KV cache: 2 (K and V) × layers × KV heads (per rank) × head_dim × element size × tokens, with tokens =
  max_model_len × `sequences` (default 4, `VLLAMA_AUTO_MEMORY_SEQUENCES` / `auto_memory_sequences:`), in whole
  blocks of 16 tokens. MLA models (DeepSeek) keep one latent of kv_lora_rank + qk_rope_head_dim per layer.
  max_model_len: the model's setting, else `--max-model-len` in extra_args, else what vLLM derives from
  config.json (max_position_embeddings and friends, RoPE scaling, the tokenizer's model_max_length).
- activations: vLLM's profiling run peaks at max_num_batched_tokens × (3 × intermediate + 4 × hidden + q/k/v
  width) elements, plus the sampler's float32 logits for max_num_seqs rows (× 3 copies). vLLM's defaults: 8192
  tokens / 1024 sequences on devices of ≥ 70 GiB, else 2048 / 256 (flags in extra_args win).
- LoRA (a model with adapters, vllama/lora.py): vLLM allocates, for each of `--max-loras` slots, A and B matrices
  of `--max-lora-rank` for every LoRA-capable linear layer (q/k/v, o, gate/up, down), whatever the adapters
  target: max_loras × rank × layers × Σ(in + out) elements. Small: 4 slots of rank 16 on an 8B model ≈ 0.2 GiB.
- overhead: OVERHEAD_GIB (CUDA graphs, NCCL and allocator slack) + OVERHEAD_FRACTION × (weights + KV cache).
- context: the CUDA context and libraries (CONTEXT_GIB: 0.8–1.4 GB measured on the H100); on the CPU build, the
  resident size of the API server, EngineCore and worker processes (CPU_CONTEXT_GIB).

vLLM then gets `--kv-cache-memory-bytes KV` (vLLM ≥ 0.11; it replaces the utilization-based KV sizing) and
`--gpu-memory-utilization need/total`, so that its start-up check (free ≥ utilization × total) asks for what
vllama made room for. The scheduler places the model with `need`.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from vllama.engine import LoraLaunch

GIB = 1024**3
BLOCK_TOKENS = 16
CONTEXT_GIB = 1.0
CPU_CONTEXT_GIB = 2.5
OVERHEAD_GIB = 0.5
OVERHEAD_FRACTION = 0.1
LOGITS_COPIES = 3
KV_FLAG = "--kv-cache-memory-bytes"
# flags that already decide the memory: auto-sizing leaves such a model alone
MEMORY_FLAGS = ("--kv-cache-memory-bytes", "--kv-cache-memory", "--gpu-memory-utilization", "--num-gpu-blocks-override")

_DTYPE_BYTES = {
    "float32": 4, "float": 4, "fp32": 4,
    "float16": 2, "half": 2, "fp16": 2, "bfloat16": 2, "bf16": 2,
    "float8": 1, "fp8": 1, "fp8_e4m3": 1, "fp8_e5m2": 1, "int8": 1,
}  # fmt: skip
_MAX_LEN_KEYS = (
    "max_position_embeddings", "n_positions", "max_seq_len", "seq_length", "max_sequence_length",
    "max_seq_length", "seq_len",
)  # fmt: skip


@dataclass(frozen=True)
class MemoryEstimate:
    """A model's need per device, in bytes, by part (see the module's docstring)."""

    total: int
    context: int
    weights: int
    kv_cache: int
    activations: int
    overhead: int
    max_model_len: int
    sequences: int
    kv_bytes_per_token: int
    weights_from: str
    lora: int = 0  # the LoRA slots' buffers

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def describe(self) -> str:
        def gib(n: int) -> str:
            return f"{n / GIB:.2f}"

        return (
            f"{gib(self.total)} GiB = context {gib(self.context)} + weights {gib(self.weights)} "
            f"({self.weights_from}) + KV cache {gib(self.kv_cache)} ({self.sequences} × {self.max_model_len} tokens) "
            f"+ activations {gib(self.activations)} + overhead {gib(self.overhead)}"
            + (f" + LoRA slots {gib(self.lora)}" if self.lora else "")
        )


@dataclass(frozen=True)
class Sizing:
    """What auto-sizing decided for one model on one device size: an estimate, or why there is none."""

    estimate: MemoryEstimate | None
    reason: str  # what was done, for ps/info

    @property
    def need(self) -> int:
        return self.estimate.total if self.estimate else 0

    def utilization(self, total: int) -> float:
        return min(1.0, math.ceil(self.need / total * 10_000) / 10_000) if total else 1.0

    def extra_args(self) -> list[str]:
        return [KV_FLAG, str(self.estimate.kv_cache)] if self.estimate else []


# --- the model's files ----------------------------------------------------------------------------------------


def hf_cache_dir() -> Path:
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    if os.environ.get("TRANSFORMERS_CACHE"):
        return Path(os.environ["TRANSFORMERS_CACHE"])
    return Path(os.environ.get("HF_HOME", "~/.cache/huggingface")).expanduser() / "hub"


def model_dir(source: str) -> Path | None:
    """The local folder of a model: a path, or a Hugging Face id's snapshot in the local hub cache."""
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    if source.count("/") != 1 or source.startswith(("/", ".", "~")):
        return None
    repo = hf_cache_dir() / f"models--{source.replace('/', '--')}"
    ref = repo / "refs" / "main"
    if ref.is_file():
        snapshot = repo / "snapshots" / ref.read_text().strip()
        if snapshot.is_dir():
            return snapshot
    snapshots = sorted((repo / "snapshots").glob("*"), key=lambda p: p.stat().st_mtime) if repo.is_dir() else []
    return snapshots[-1] if snapshots else None


def read_config(folder: Path) -> dict[str, Any]:
    config = json.loads((folder / "config.json").read_text())
    if not isinstance(config, dict):
        raise ValueError("config.json is not a JSON object")
    tokenizer = folder / "tokenizer_config.json"
    if tokenizer.is_file():
        try:
            model_max = json.loads(tokenizer.read_text()).get("model_max_length")
        except (OSError, ValueError, AttributeError):
            model_max = None
        if isinstance(model_max, int | float) and model_max < 10**9:
            config = {**config, "_tokenizer_model_max_length": int(model_max)}
    return config


def checkpoint_bytes(folder: Path) -> tuple[int | None, str]:
    """Bytes of the weights on disk (None if there are none) and where the number comes from."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            total = json.loads(index.read_text()).get("metadata", {}).get("total_size")
        except (OSError, ValueError, AttributeError):
            total = None
        if isinstance(total, int) and total > 0:
            return total, "safetensors index"
    for pattern, what in (("*.safetensors", "safetensors files"), ("*.bin", ".bin files"), ("*.pt", ".pt files")):
        files = [p for p in folder.glob(pattern) if p.is_file() and not p.name.startswith("training_args")]
        if files:
            return sum(p.stat().st_size for p in files), what
    return None, "no weight files"


# --- the estimate ---------------------------------------------------------------------------------------------


def _text_config(config: dict[str, Any]) -> dict[str, Any]:
    inner = config.get("text_config") or config.get("language_config") or config.get("llm_config")
    return {**config, **inner} if isinstance(inner, dict) else config


def _first(config: dict[str, Any], *keys: str, default: Any = None) -> Any:
    for key in keys:
        value = config.get(key)
        if value is not None:
            return value
    return default


def dtype_bytes(name: Any, default: int = 2) -> int:
    text = str(name or "").lower().removeprefix("torch.")
    return _DTYPE_BYTES.get(text, default)


def derived_max_model_len(config: dict[str, Any]) -> int:
    """The max_model_len vLLM derives from config.json when none is given (a close approximation)."""
    lengths = [int(config[k]) for k in _MAX_LEN_KEYS if isinstance(config.get(k), int | float) and config[k] > 0]
    length = min(lengths) if lengths else 2048
    tokenizer_max = config.get("_tokenizer_model_max_length")
    if isinstance(tokenizer_max, int) and tokenizer_max > 0:
        length = min(length, tokenizer_max)
    rope = config.get("rope_parameters") or config.get("rope_scaling")
    if isinstance(rope, dict) and "gemma3" not in str(config.get("model_type", "")):
        kind = rope.get("rope_type") or rope.get("type") or "default"
        factor = rope.get("factor")
        if kind not in ("default", "su", "longrope", "llama3") and isinstance(factor, int | float) and factor > 0:
            if kind == "yarn" and rope.get("original_max_position_embeddings"):
                length = int(rope["original_max_position_embeddings"])
            length = int(length * factor)
    return length


def _shape(c: dict[str, Any]) -> tuple[int, int, int, int, int, int]:
    """(hidden, layers, heads, KV heads, head_dim, intermediate) of a text config."""
    hidden = int(_first(c, "hidden_size", "n_embd", "d_model", default=0))
    layers = int(_first(c, "num_hidden_layers", "n_layer", "num_layers", default=0))
    heads = int(_first(c, "num_attention_heads", "n_head", default=1))
    kv_heads = int(_first(c, "num_key_value_heads", "num_kv_heads", default=heads))
    head_dim = int(_first(c, "head_dim", default=hidden // max(heads, 1)))
    inter = int(_first(c, "intermediate_size", "ffn_dim", "n_inner", default=4 * hidden))
    return hidden, layers, heads, kv_heads, head_dim, inter


def parameter_count(config: dict[str, Any]) -> int:
    """Parameters of a decoder-only transformer from its config (embeddings, attention, MLP, norms)."""
    c = _text_config(config)
    hidden, layers, heads, kv_heads, head_dim, inter = _shape(c)
    vocab = int(_first(c, "vocab_size", default=32000))
    experts = int(_first(c, "num_local_experts", "num_experts", "n_routed_experts", default=1) or 1)
    attention = hidden * heads * head_dim * 2 + hidden * kv_heads * head_dim * 2
    mlp = 3 * hidden * inter * experts
    embeddings = vocab * hidden * (1 if c.get("tie_word_embeddings", True) else 2)
    return embeddings + layers * (attention + mlp + 2 * hidden) + hidden


def kv_bytes_per_token(config: dict[str, Any], element_bytes: int, tp: int = 1) -> int:
    """KV cache bytes per token on one tensor-parallel rank."""
    c = _text_config(config)
    layers = int(_first(c, "num_hidden_layers", "n_layer", "num_layers", default=0))
    if c.get("kv_lora_rank"):  # MLA: one compressed latent per layer, replicated on every rank
        return layers * (int(c["kv_lora_rank"]) + int(c.get("qk_rope_head_dim") or 0)) * element_bytes
    hidden = int(_first(c, "hidden_size", "n_embd", "d_model", default=0))
    heads = int(_first(c, "num_attention_heads", "n_head", default=1))
    kv_heads = 1 if c.get("multi_query") else int(_first(c, "num_key_value_heads", "num_kv_heads", default=heads))
    head_dim = int(_first(c, "head_dim", default=hidden // max(heads, 1)))
    per_rank = max(1, math.ceil(kv_heads / tp))
    return 2 * layers * per_rank * head_dim * element_bytes


def activation_bytes(
    config: dict[str, Any], *, element_bytes: int, batched_tokens: int, max_seqs: int, tp: int = 1
) -> int:
    """Peak of vLLM's profiling forward pass: one layer's widest intermediates for `batched_tokens` tokens,
    plus the sampler's float32 logits for `max_seqs` rows."""
    c = _text_config(config)
    hidden = int(_first(c, "hidden_size", "n_embd", "d_model", default=0))
    heads = int(_first(c, "num_attention_heads", "n_head", default=1))
    kv_heads = int(_first(c, "num_key_value_heads", "num_kv_heads", default=heads))
    head_dim = int(_first(c, "head_dim", default=hidden // max(heads, 1)))
    inter = int(_first(c, "intermediate_size", "ffn_dim", "n_inner", default=4 * hidden))
    vocab = int(_first(c, "vocab_size", default=32000))
    width = 3 * inter // tp + 4 * hidden + (heads + 2 * kv_heads) * head_dim // tp
    return batched_tokens * width * element_bytes + max_seqs * vocab * 4 * LOGITS_COPIES


def lora_bytes(config: dict[str, Any], *, max_loras: int, max_rank: int, element_bytes: int, tp: int = 1) -> int:
    """vLLM's LoRA buffers: for each slot, A (rank × in) and B (out × rank) for every LoRA-capable linear layer
    of every decoder layer (q, k, v, o, gate, up, down), in the model's dtype. Split across tensor-parallel
    ranks only in part: counted whole (an over-estimate of a few MB)."""
    hidden, layers, heads, kv_heads, head_dim, inter = _shape(_text_config(config))
    q, kv = heads * head_dim, kv_heads * head_dim
    # (in + out) of each linear layer: q, k, v, o, gate, up, down
    widths = (hidden + q) + 2 * (hidden + kv) + (q + hidden) + 2 * (hidden + inter) + (inter + hidden)
    return max_loras * max_rank * layers * widths * element_bytes


def estimate(
    config: dict[str, Any],
    *,
    weights_on_disk: int | None = None,
    weights_from: str = "safetensors files",
    max_model_len: int | None = None,
    sequences: int = 4,
    tp: int = 1,
    dtype: str | None = None,
    kv_cache_dtype: str | None = None,
    max_num_batched_tokens: int | None = None,
    max_num_seqs: int | None = None,
    device_total: int = 80 * GIB,
    device_kind: str = "cuda",
    lora_slots: int = 0,
    lora_rank: int = 0,
) -> MemoryEstimate:
    """The need per device of a model served by vLLM with these settings (see the module's docstring)."""
    c = _text_config(config)
    checkpoint_dtype = _first(c, "torch_dtype", "dtype", default="bfloat16")
    served = dtype if dtype and dtype != "auto" else checkpoint_dtype
    element = dtype_bytes(served)
    if element == 4 and (not dtype or dtype == "auto"):
        element = 2  # vLLM serves float32 checkpoints in 16 bits unless told otherwise
    if weights_on_disk:
        weights = weights_on_disk
        if dtype_bytes(checkpoint_dtype) == 4 and element == 2:
            weights //= 2
    else:
        weights, weights_from = parameter_count(config) * element, "parameter count × dtype"
    weights = math.ceil(weights / tp)
    length = max_model_len or derived_max_model_len(c)
    kv_element = 1 if kv_cache_dtype and kv_cache_dtype.startswith("fp8") else element
    per_token = kv_bytes_per_token(c, kv_element, tp)
    tokens = math.ceil(length * sequences / BLOCK_TOKENS) * BLOCK_TOKENS
    kv = per_token * tokens
    large = device_total >= 70 * GIB
    batched = max_num_batched_tokens or (8192 if large else 2048)
    seqs = max_num_seqs or (1024 if large else 256)
    activations = activation_bytes(c, element_bytes=element, batched_tokens=batched, max_seqs=seqs, tp=tp)
    overhead = int(OVERHEAD_GIB * GIB + OVERHEAD_FRACTION * (weights + kv))
    context = int((CPU_CONTEXT_GIB if device_kind == "cpu" else CONTEXT_GIB) * GIB)
    lora = lora_bytes(c, max_loras=lora_slots, max_rank=lora_rank, element_bytes=element, tp=tp) if lora_slots else 0
    total = context + weights + kv + activations + overhead + lora
    return MemoryEstimate(
        total=total,
        context=context,
        weights=weights,
        kv_cache=kv,
        activations=activations,
        overhead=overhead,
        max_model_len=length,
        sequences=sequences,
        kv_bytes_per_token=per_token,
        weights_from=weights_from,
        lora=lora,
    )


def flag_value(args: list[str], flag: str) -> str | None:
    """The value of the last `--flag V` / `--flag=V` in a vLLM argument list."""
    value = None
    for i, arg in enumerate(args):
        if arg == flag and i + 1 < len(args):
            value = args[i + 1]
        elif arg.startswith(flag + "="):
            value = arg.split("=", 1)[1]
    return value


def _int_flag(args: list[str], flag: str) -> int | None:
    value = flag_value(args, flag)
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def size_model(
    source: str,
    *,
    extra_args: list[str],
    max_model_len: int | None,
    tp: int,
    sequences: int,
    device_total: int,
    device_kind: str,
    lora: LoraLaunch | None = None,
) -> Sizing:
    """Auto-size the model vLLM loads from `source` (a local folder or a cached Hugging Face id)."""
    if any(flag_value(extra_args, f) is not None or f in extra_args for f in MEMORY_FLAGS):
        return Sizing(None, "extra_args set the memory: vLLM's flags decide")
    folder = model_dir(source)
    if folder is None or not (folder / "config.json").is_file():
        where = "not a local folder" if source.startswith(("/", "~", ".")) else "not in the local Hugging Face cache"
        return Sizing(None, f"auto memory: {source} is {where}: default rule used")
    try:
        config = read_config(folder)
        on_disk, weights_from = checkpoint_bytes(folder)
        result = estimate(
            config,
            weights_on_disk=on_disk,
            weights_from=weights_from,
            max_model_len=max_model_len or _int_flag(extra_args, "--max-model-len"),
            sequences=sequences,
            tp=max(tp, _int_flag(extra_args, "--tensor-parallel-size") or 1),
            dtype=flag_value(extra_args, "--dtype"),
            kv_cache_dtype=flag_value(extra_args, "--kv-cache-dtype"),
            max_num_batched_tokens=_int_flag(extra_args, "--max-num-batched-tokens"),
            max_num_seqs=_int_flag(extra_args, "--max-num-seqs"),
            device_total=device_total,
            device_kind=device_kind,
            lora_slots=lora.max_loras if lora else 0,
            lora_rank=lora.max_lora_rank if lora else 0,
        )
    except (OSError, ValueError, TypeError, KeyError) as exc:
        return Sizing(None, f"auto memory: cannot read {folder}: {exc}: default rule used")
    if result.total > device_total:
        return Sizing(
            None,
            f"auto memory: the estimate ({result.total / GIB:.1f} GiB) exceeds the device "
            f"({device_total / GIB:.1f} GiB): default rule used; lower max_model_len or auto_memory_sequences",
        )
    return Sizing(result, f"auto memory: {result.describe()}")
