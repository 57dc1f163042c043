"""Daemon settings (environment / CLI flags) and the per-model `models.yaml` schema.

`models.yaml` maps a model name (a Hugging Face id, a local path, or any name with `model:` pointing at one)
to its settings. Unknown keys and bad values are errors that name the model, the key and the value: a typo must
never silently fall back to a default.

LoRA adapters (vllama/lora.py) are listed under their base model and requested by their own name:

    my-base:
      model: /models/llama
      adapters:                    # adapter name → folder of a PEFT LoRA adapter (absolute or ~ path)
        sql-lora: /adapters/sql
      adapter_dirs: [/adapters/x]  # every subfolder holding an adapter_config.json is an adapter, named after it
      max_loras: 2                 # adapters loaded at once (default: vLLM's 1)
      max_lora_rank: 16            # default: the highest rank among the adapters' adapter_config.json

An adapter's path is only checked when the adapter is loaded (a wrong one fails that adapter's requests, nothing
else); an `adapter_dirs` folder is read when models.yaml is loaded, and must exist then.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import math
import os
import re
import sys
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from vllama.errors import ConfigError
from vllama.model_access import AllowModels, parse_allow_models

GIB = 1024**3

_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(value: Any) -> float | None:
    """Seconds from `30`, `"90s"`, `"5m"`, `"1h30m"`; None for "never" (`-1`, `"never"`, `"forever"`, null, and
    anything of a century or more, which no clock or date can add to now)."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise ValueError(f"not a duration: {value!r}")
    if isinstance(value, int | float):
        return _seconds(float(value), value)
    text = str(value).strip().lower()
    if text in ("never", "forever", "inf", "-1"):
        return None
    try:
        number = float(text)
    except ValueError:
        pass
    else:
        return _seconds(number, value)
    pos, total = 0, 0.0
    for match in _DURATION_PART.finditer(text):
        if match.start() != pos:
            break
        total += float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
        pos = match.end()
    if pos != len(text) or not text:
        raise ValueError(f"not a duration: {value!r} (use e.g. 30s, 5m, 1h30m, or -1 for never)")
    return _seconds(total, value)


_FOREVER_S = 100 * 365 * 86400.0


def _seconds(number: float, value: Any) -> float | None:
    if math.isnan(number):
        raise ValueError(f"not a duration: {value!r}")
    return None if number < 0 or number >= _FOREVER_S else number


# the ranks vLLM accepts for --max-lora-rank (vllm/config/lora.py, 0.26–0.33)
LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
ADAPTER_CONFIG = "adapter_config.json"  # marks a PEFT adapter folder

# flags vllama owns: a child listens on vllama's Unix socket (or binds 127.0.0.1 on vllama's port): its
# sleep/RPC endpoints are unauthenticated
_RESERVED_FLAGS = {"--host", "--port", "--uds", "--served-model-name", "--model"}
# flags that decide how much memory a child takes, or on how many GPUs: vLLM takes the last one given, so in
# extra_args they would silently contradict what vllama made room for. Flag → the models.yaml key to use.
_PLANNED_FLAGS = {
    "--gpu-memory-utilization": "gpu_memory_utilization (or gpu_memory_gib, or memory: auto)",
    "--kv-cache-memory-bytes": "gpu_memory_gib (the memory per device) or memory: auto",
    "--kv-cache-memory": "gpu_memory_gib (the memory per device) or memory: auto",
    "--tensor-parallel-size": "tensor_parallel_size (or devices)",
    "-tp": "tensor_parallel_size (or devices)",
    "--pipeline-parallel-size": "pipeline_parallel_size (with devices or tensor_parallel_size)",
    "-pp": "pipeline_parallel_size (with devices or tensor_parallel_size)",
    "--data-parallel-size": "nothing: vllama runs one engine per model; configure a second model name instead",
    "-dp": "nothing: vllama runs one engine per model; configure a second model name instead",
}
# the environment vllama sets for each child from its placement
_PLANNED_ENV = {"CUDA_VISIBLE_DEVICES": "devices", "CUDA_DEVICE_ORDER": "devices"}


def _flag_name(arg: str) -> str | None:
    """The vLLM flag an argument is, normalised as vLLM's parser does (`--a_b=1` → `--a-b`); None for a value.
    A short flag with its value glued on (`-tp2`) is the short flag."""
    if not arg.startswith("-") or arg == "-" or arg[1:2].isdigit():
        return None
    name = arg.split("=", 1)[0]
    if name.startswith("--"):
        return "--" + name[2:].replace("_", "-")
    for short in ("-tp", "-pp", "-dp"):
        if name.startswith(short):
            return short
    return name


def planned_flag(arg: str) -> tuple[str, str] | None:
    """(the flag, the models.yaml key to use instead) when `arg` is a flag vllama plans itself."""
    name = _flag_name(arg)
    if name is None:
        return None
    if name in _PLANNED_FLAGS:
        return name, _PLANNED_FLAGS[name]
    # argparse takes an unambiguous prefix of a long flag for the flag (`--tensor-parallel` …)
    if name.startswith("--") and len(name) >= 8:
        for flag, key in _PLANNED_FLAGS.items():
            if flag.startswith(name):
                return flag, key
    return None


class KeepAlive(BaseModel):
    """Idle times (since the last request finished) after which an idle model steps down.

    Each step is skipped when null; a step that needs sleep mode is skipped where the engine has none (CPU).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    sleep_l1: float | None = 5 * 60.0
    sleep_l2: float | None = 30 * 60.0
    stop: float | None = 2 * 3600.0

    @field_validator("sleep_l1", "sleep_l2", "stop", mode="before")
    @classmethod
    def _duration(cls, value: Any) -> float | None:
        return parse_duration(value)

    @classmethod
    def parse(cls, value: Any) -> KeepAlive:
        """A mapping, or a scalar: how long the model stays loaded before it is stopped (Ollama's meaning)."""
        if isinstance(value, KeepAlive):
            return value
        if isinstance(value, dict):
            return cls.model_validate(value)
        return cls(sleep_l1=None, sleep_l2=None, stop=parse_duration(value))


class ModelConfig(BaseModel):
    """One entry of models.yaml. Field names follow the spec (and vLLM's flags) where they exist."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str | None = Field(default=None, description="what vLLM loads (HF id or path); default: the name")
    aliases: list[str] = Field(default_factory=list)
    gpu_memory_utilization: float | None = Field(default=None, gt=0, le=1)
    gpu_memory_gib: float | None = Field(default=None, gt=0, description="need per device in GiB")
    max_model_len: int | None = Field(default=None, gt=0)
    devices: list[int] | None = None
    tensor_parallel_size: int | None = Field(default=None, ge=1)
    pipeline_parallel_size: int | None = Field(default=None, ge=1)
    extra_args: list[str] = Field(default_factory=list)
    env: dict[str, str] = Field(default_factory=dict)
    pinned: bool = False
    sleep_level: Literal[1, 2, 3] = 2
    keep_alive: KeepAlive | None = None
    startup_timeout: float | None = Field(default=None, gt=0)
    vllm_command: list[str] | None = Field(default=None, description="command prefix that runs vLLM's server")
    # cold starts may use a pre-imported interpreter of the warm pool (vllama/pool.py); false: always a fresh one
    prewarm: bool = True
    # "auto": size the memory from the checkpoint (vllama/sizing.py) when no explicit setting is given;
    # "default": vLLM's default fraction even if VLLAMA_AUTO_MEMORY=1
    memory: Literal["auto", "default"] | None = None
    auto_memory_sequences: int | None = Field(default=None, ge=1, description="sequences of max_model_len in KV")
    # LoRA adapters served on top of this model (see the module's docstring); after parsing, `adapters` also
    # holds the adapters found in `adapter_dirs`
    adapters: dict[str, str] = Field(default_factory=dict)
    adapter_dirs: list[str] = Field(default_factory=list)
    max_loras: int | None = Field(default=None, ge=1, le=256)
    max_lora_rank: int | None = None

    @field_validator("adapters")
    @classmethod
    def _adapters_valid(cls, value: dict[str, str]) -> dict[str, str]:
        for name, path in value.items():
            _check_adapter_name(name)
            _check_absolute(path, f"adapter {name!r}")
        return value

    @field_validator("adapter_dirs")
    @classmethod
    def _adapter_dirs_valid(cls, value: list[str]) -> list[str]:
        for path in value:
            _check_absolute(path, "adapter folder")
        return value

    @field_validator("max_lora_rank")
    @classmethod
    def _lora_rank_valid(cls, value: int | None) -> int | None:
        if value is not None and value not in LORA_RANKS:
            raise ValueError(f"vLLM accepts only {', '.join(map(str, LORA_RANKS))}")
        return value

    @field_validator("keep_alive", mode="before")
    @classmethod
    def _keep_alive(cls, value: Any) -> KeepAlive | None:
        return None if value is None else KeepAlive.parse(value)

    @field_validator("startup_timeout", mode="before")
    @classmethod
    def _timeout(cls, value: Any) -> float | None:
        return parse_duration(value)

    @field_validator("devices", mode="before")
    @classmethod
    def _devices(cls, value: Any) -> Any:
        if isinstance(value, int) and not isinstance(value, bool):
            return [value]
        if isinstance(value, str):
            return [int(part) for part in value.split(",") if part.strip()]
        return value

    @field_validator("devices")
    @classmethod
    def _devices_valid(cls, value: list[int] | None) -> list[int] | None:
        if value is None:
            return None
        if not value:
            raise ValueError("devices must name at least one device (or be left out)")
        if any(d < 0 for d in value) or len(set(value)) != len(value):
            raise ValueError(f"devices must be distinct non-negative indices, got {value}")
        return value

    @field_validator("model")
    @classmethod
    def _model_not_a_flag(cls, value: str | None) -> str | None:
        if value is not None and (not value.strip() or value.startswith("-")):
            raise ValueError("must be a Hugging Face id or a path (vLLM would read a leading '-' as a flag)")
        return value

    @field_validator("aliases")
    @classmethod
    def _aliases_not_flags(cls, value: list[str]) -> list[str]:
        for alias in value:
            if not alias.strip() or alias.startswith("-"):
                raise ValueError(f"alias {alias!r} must be non-empty and not start with '-' (vLLM reads it as a flag)")
        return value

    @field_validator("extra_args")
    @classmethod
    def _no_bind_args(cls, value: list[str]) -> list[str]:
        for arg in value:
            flag = _flag_name(arg) or arg.split("=", 1)[0]
            if flag in _RESERVED_FLAGS:
                raise ValueError(
                    f"{flag} is set by vllama (children listen on a Unix socket in a folder only vllama's user can "
                    "open, or on 127.0.0.1 at a port vllama picks: VLLAMA_CHILD_TRANSPORT)"
                )
            planned = planned_flag(arg)
            if planned is not None:
                raise ValueError(
                    f"{arg} in extra_args would contradict vllama's plan ({planned[0]} decides memory or GPUs, "
                    f"which vllama reserves and passes itself): use the models.yaml key {planned[1]}"
                )
        return value

    @field_validator("env")
    @classmethod
    def _no_placement_env(cls, value: dict[str, str]) -> dict[str, str]:
        for name, key in _PLANNED_ENV.items():
            if name in value:
                raise ValueError(f"{name} is set by vllama from where it places the model: use the key {key!r}")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> ModelConfig:
        if self.gpu_memory_utilization is not None and self.gpu_memory_gib is not None:
            raise ValueError("set gpu_memory_utilization or gpu_memory_gib, not both")
        if self.memory == "auto" and (self.gpu_memory_utilization is not None or self.gpu_memory_gib is not None):
            raise ValueError("memory: auto sizes the memory itself: drop gpu_memory_utilization/gpu_memory_gib")
        if not (self.adapters or self.adapter_dirs) and (self.max_loras or self.max_lora_rank):
            raise ValueError("max_loras/max_lora_rank without adapters or adapter_dirs: list the adapters")
        pp = self.pipeline_parallel_size or 1
        if self.devices is not None:
            if self.tensor_parallel_size is not None and len(self.devices) != self.tensor_parallel_size * pp:
                product = f" × pipeline_parallel_size {pp}" if pp > 1 else ""
                raise ValueError(
                    f"tensor_parallel_size {self.tensor_parallel_size}{product} needs exactly "
                    f"{self.tensor_parallel_size * pp} devices, got devices {self.devices}"
                )
            if len(self.devices) % pp:
                raise ValueError(
                    f"pipeline_parallel_size {pp} must divide the number of devices, got devices {self.devices}"
                )
        return self

    @property
    def source(self) -> str | None:
        """What vLLM loads: `model`, with `~` expanded (vLLM's argv goes through no shell)."""
        return os.path.expanduser(self.model) if self.model else None

    @property
    def pp(self) -> int:
        return self.pipeline_parallel_size or 1

    @property
    def tp(self) -> int:
        """vLLM's tensor-parallel size: the setting, else the devices a pipeline stage gets."""
        if self.tensor_parallel_size is not None:
            return self.tensor_parallel_size
        return len(self.devices) // self.pp if self.devices else 1

    @property
    def device_count(self) -> int:
        """How many GPUs one instance uses: tensor_parallel_size × pipeline_parallel_size."""
        return self.tp * self.pp

    @property
    def lora_enabled(self) -> bool:
        """vLLM runs this model with LoRA layers. Its level-2 wake then fails: vLLM 0.26's reload_weights does not
        know the LoRA-wrapped layers' names (bench/results/2026-11-27-h100-lora-wake/), so such a model never
        sleeps at level 2 (level 1, or a stop, instead)."""
        return bool(self.adapters) or any(a.split("=", 1)[0] == "--enable-lora" for a in self.extra_args)


def _check_adapter_name(name: str) -> None:
    if not name.strip() or name.startswith("-") or name != name.strip():
        raise ValueError(f"adapter name {name!r} must be non-empty, without surrounding spaces, not start with '-'")


def _check_absolute(path: str, what: str) -> None:
    if not isinstance(path, str) or not path.strip():
        raise ValueError(f"{what}: the path must be a non-empty string")
    if not Path(path).expanduser().is_absolute():
        raise ValueError(f"{what}: {path!r} is not an absolute path (start it with / or ~)")


@dataclass(frozen=True)
class AdapterRef:
    """A LoRA adapter of models.yaml: its name (what requests ask for and vLLM serves it as), its base model's
    canonical name, and its folder."""

    name: str
    base: str
    path: Path


def scan_adapter_dir(folder: Path) -> dict[str, str]:
    """name → path of each adapter (a subfolder holding adapter_config.json) in `folder`, sorted by name."""
    return {
        sub.name: str(sub)
        for sub in sorted(folder.iterdir())
        if sub.is_dir() and not sub.name.startswith(".") and (sub / ADAPTER_CONFIG).is_file()
    }


def _with_scanned_adapters(origin: str, name: str, cfg: ModelConfig) -> ModelConfig:
    """`cfg` whose `adapters` also hold those found in its `adapter_dirs` (an explicit entry wins)."""
    if not cfg.adapter_dirs:
        return cfg
    found: dict[str, str] = {}
    for raw in cfg.adapter_dirs:
        folder = Path(raw).expanduser()
        try:
            scanned = scan_adapter_dir(folder)
        except OSError as exc:
            raise ConfigError(f"{origin}: model {name!r}: key 'adapter_dirs' has bad value {raw!r}: {exc}") from None
        for adapter, path in scanned.items():
            if adapter in found and found[adapter] != path:
                raise ConfigError(
                    f"{origin}: model {name!r}: adapter {adapter!r} is in two adapter_dirs ({found[adapter]} and "
                    f"{path}): rename one or list it under adapters"
                )
            found[adapter] = path
    return cfg.model_copy(update={"adapters": {**found, **cfg.adapters}})


class ModelsFile:
    """The parsed models.yaml: name → config, with aliases and adapter names resolved."""

    def __init__(self, models: dict[str, ModelConfig] | None = None, origin: str = "models.yaml") -> None:
        self.models: dict[str, ModelConfig] = dict(models or {})
        self.aliases: dict[str, str] = {}
        self.adapters: dict[str, AdapterRef] = {}
        for name, cfg in self.models.items():
            for alias in cfg.aliases:
                if alias in self.models or alias in self.aliases:
                    raise ConfigError(f"{origin}: alias {alias!r} of model {name!r} is already a model or alias")
                self.aliases[alias] = name
        for name, cfg in self.models.items():
            for adapter, path in cfg.adapters.items():
                # an adapter is requested by its name alone: it must not shadow a model, an alias or another adapter
                taken = self.adapters.get(adapter)
                if adapter in self.models or adapter in self.aliases or taken is not None:
                    what = f"an adapter of model {taken.base!r}" if taken else "a model or alias"
                    raise ConfigError(f"{origin}: adapter {adapter!r} of model {name!r} is already {what}")
                self.adapters[adapter] = AdapterRef(adapter, name, Path(path).expanduser())

    def canonical(self, name: str) -> str:
        return self.aliases.get(name, name)

    def get(self, name: str) -> ModelConfig | None:
        return self.models.get(self.canonical(name))

    def adapter(self, name: object) -> AdapterRef | None:
        """The adapter a request's model name names, or None (a model, or unknown)."""
        return self.adapters.get(name) if isinstance(name, str) else None

    def adapters_of(self, base: str) -> list[AdapterRef]:
        return [ref for ref in self.adapters.values() if ref.base == base]


def parse_models(data: Any, origin: str = "models.yaml") -> ModelsFile:
    if data is None:
        return ModelsFile()
    if not isinstance(data, dict):
        raise ConfigError(
            f"{origin}: the top level must be a mapping of model name to settings, got {type(data).__name__}"
        )
    models: dict[str, ModelConfig] = {}
    for name, raw in data.items():
        if not isinstance(name, str) or not name.strip():
            raise ConfigError(f"{origin}: model names must be non-empty strings, got {name!r}")
        if name.startswith("-"):
            raise ConfigError(
                f"{origin}: model name {name!r} starts with '-', which vLLM would read as a flag: rename it"
            )
        if any(unicodedata.category(ch) in ("Cc", "Zl", "Zp") for ch in name):
            # a line break or control character does not survive a YAML round trip (`vllama assign` rewrites
            # the file), nor a log file name or an HTTP header
            raise ConfigError(f"{origin}: model name {name!r} contains a control character or line break: rename it")
        try:
            cfg = ModelConfig.model_validate(raw or {})
        except ValidationError as exc:
            raise ConfigError(describe_validation_error(origin, name, raw, exc)) from None
        models[name] = _with_scanned_adapters(origin, name, cfg)
    return ModelsFile(models, origin)


def describe_validation_error(origin: str, name: str, raw: Any, exc: ValidationError) -> str:
    problems = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"])
        key = str(err["loc"][0]) if err["loc"] else None
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            known = ", ".join(sorted(ModelConfig.model_fields))
            close = difflib.get_close_matches(str(key), ModelConfig.model_fields, n=1) if key else []
            hint = f"did you mean {close[0]!r}? " if close else ""
            problems.append(f"unknown key {loc!r} ({hint}known keys: {known})")
        elif key is None:  # the entry as a whole: not a mapping, or keys that contradict each other
            problems.append(f"{msg} (entry: {raw!r})")
        else:
            value = raw.get(key) if isinstance(raw, dict) else raw
            problems.append(f"key {loc!r} has bad value {value!r}: {msg}")
    return f"{origin}: model {name!r}: " + "; ".join(problems)


def load_models_file(path: Path) -> ModelsFile:
    if not path.exists():
        return ModelsFile()
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot be read: {exc}") from None
    return parse_models_text(text, str(path))


def parse_models_text(text: str, origin: str = "models.yaml") -> ModelsFile:
    """models.yaml's text → ModelsFile; anything wrong with it is a ConfigError naming what and where."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{origin}: not valid YAML: {exc}") from None
    except RecursionError:
        raise ConfigError(f"{origin}: not valid YAML: nested too deeply") from None
    return parse_models(data, origin)


def update_model_entry(path: Path, name: str, changes: dict[str, Any]) -> ModelConfig:
    """Merge `changes` into the model's entry of models.yaml and write it back; validated before writing."""
    data: dict[str, Any] = {}
    if path.exists():
        try:
            loaded = yaml.safe_load(path.read_text())
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML (fix it before assigning): {exc}") from None
        if loaded is not None:
            if not isinstance(loaded, dict):
                raise ConfigError(f"{path}: the top level must be a mapping")
            data = loaded
    existing = data.get(name) or {}
    if not isinstance(existing, dict):
        raise ConfigError(f"{path}: model {name!r}: the entry must be a mapping of settings, got {existing!r}")
    entry = dict(existing)
    entry.update(changes)
    entry = {k: v for k, v in entry.items() if v is not None}
    data[name] = entry
    parsed = parse_models(data, str(path))  # refuses to write anything invalid
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".yaml.tmp")
    tmp.write_text(yaml.safe_dump(data, sort_keys=False, allow_unicode=True))
    tmp.replace(path)
    return parsed.models[name]


def _env_value(name: str, parse: Callable[[str], Any]) -> Any:
    """The parsed value of environment variable `name`, or None when unset/empty; a bad value is a ConfigError."""
    raw = os.environ.get(name)
    if not raw:
        return None
    try:
        return parse(raw)
    except (ValueError, ValidationError) as exc:
        detail = str(exc).splitlines()[0] if not isinstance(exc, ValidationError) else _describe_errors(exc)
        raise ConfigError(f"environment variable {name}={raw!r} is invalid: {detail}") from None


def _describe_errors(exc: ValidationError) -> str:
    return "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'value'}: {e['msg']}" for e in exc.errors())


def _port_range(raw: str) -> tuple[int, int]:
    lo, sep, hi = raw.partition("-")
    if not sep:
        raise ValueError("expected LOW-HIGH, e.g. 33300-33999")
    low, high = int(lo), int(hi)
    if not 0 < low <= high < 65536:
        raise ValueError("expected 0 < LOW <= HIGH < 65536")
    return low, high


def _secret_env(name: str) -> str | None:
    """An API key from the environment (None when unset or empty); a bad one is a ConfigError that does not
    repeat the value."""
    key = os.environ.get(name, "").strip()
    if not key:
        return None
    if not (key.isascii() and key.isprintable()) or " " in key:  # it travels as `Authorization: Bearer <key>`
        raise ConfigError(f"environment variable {name} is invalid: an API key must be printable ASCII without spaces")
    return key


def _flag(raw: str) -> bool:
    value = raw.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError("expected 1/0, true/false, yes/no or on/off")


_YEAR_S = 365 * 86400.0
_LOG_LEVELS = ("debug", "info", "warning", "error", "critical")


def _plain(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


def _number(
    low: float, high: float, *, above: bool = False, unit: str = "", integer: bool = False
) -> Callable[[str], Any]:
    """A parser of one number in [low, high] (or (low, high] with `above`); anything else (nan, inf, out of
    range, not a number) is a ValueError that states the allowed range, for the message naming the variable."""
    kind = "a whole number" if integer else "a number"
    allowed = f"{kind}{' of ' + unit if unit else ''} {'>' if above else '>='} {_plain(low)} and <= {_plain(high)}"

    def parse(raw: str) -> Any:
        try:
            value: float = int(raw) if integer else float(raw)
        except ValueError:
            raise ValueError(f"not {kind}; allowed: {allowed}") from None
        if not math.isfinite(value) or value > high or value < low or (above and value == low):
            raise ValueError(f"out of range; allowed: {allowed}")
        return value

    return parse


def _choice(*choices: str) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        value = raw.strip().lower()
        if value not in choices:
            raise ValueError(f"allowed: {', '.join(choices)}")
        return value

    return parse


def _pairs(raw: str) -> list[tuple[int, int]]:
    """ "0-1,2-3" → [(0, 1), (2, 3)]."""
    out = []
    for part in raw.split(","):
        a, sep, b = part.partition("-")
        if not sep:
            raise ValueError(f"expected pairs like 0-1,2-3, got {part!r}")
        out.append((int(a), int(b)))
    return out


def _keep_alive(raw: str) -> KeepAlive:
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return KeepAlive.parse(value)


# a Unix socket's path is at most 107 bytes (sun_path holds 108 with the final NUL)
UNIX_PATH_MAX = 107
# the longest socket file name vllama makes in the run folder (`engine.pick_socket`): a model's name cut to
# 40 characters, "-N" (1 to 99), ".sock"
SOCKET_NAME_MAX = 48


def socket_dir(home: Path) -> Path:
    """Where the children's sockets go: `<home>/run`, unless a socket path there could be longer than a Unix
    socket allows; then `$XDG_RUNTIME_DIR/vllama-<hash>` (a per-user 0700 folder, when set and short enough),
    else `/tmp/vllama-<uid>-<hash>` (the hash tells the homes apart; `engine.private_dir` refuses a folder
    there that another user made first)."""
    home = home.expanduser().absolute()
    preferred = home / "run"
    if len(os.fsencode(preferred)) + 1 + SOCKET_NAME_MAX <= UNIX_PATH_MAX:
        return preferred
    tag = hashlib.sha256(os.fsencode(home)).hexdigest()[:12]
    runtime = os.environ.get("XDG_RUNTIME_DIR", "")
    if runtime.startswith("/"):
        candidate = Path(runtime) / f"vllama-{tag}"
        if len(os.fsencode(candidate)) + 1 + SOCKET_NAME_MAX <= UNIX_PATH_MAX:
            return candidate
    return Path("/tmp") / f"vllama-{os.getuid()}-{tag}"


@dataclass
class Settings:
    """Daemon-wide settings; each has an environment variable `VLLAMA_<NAME>`."""

    home: Path = field(default_factory=lambda: Path(os.environ.get("VLLAMA_HOME", "~/.vllama")).expanduser())
    host: str = "0.0.0.0"
    port: int = 33258
    log_level: str = "info"
    # how vllama reaches its vLLM children: "uds" (a Unix socket in run_dir, a folder only vllama's user can
    # open) or "tcp" (a port of port_range on 127.0.0.1, which every local user can reach; for a vLLM without --uds)
    child_transport: str = "uds"
    # ports handed to vLLM children with child_transport tcp (each binds 127.0.0.1 only)
    port_range: tuple[int, int] = (33300, 33999)
    # the command that runs vLLM's OpenAI server; the model's own `vllm_command` wins
    vllm_command: list[str] = field(
        default_factory=lambda: [sys.executable, "-m", "vllm.entrypoints.openai.api_server"]
    )
    # "auto" (NVML if a GPU is visible, else the CPU budget), "nvml", "cpu" or "fake" (tests)
    gpu_probe: str = "auto"
    cpu_memory_gib: float | None = None  # budget of the CPU "device"; default 80% of RAM
    cpu_default_model_gib: float = 4.0  # need of a model without a memory setting on the CPU device
    fake_gpu_ledger: Path | None = None
    fake_gpu_total_gib: list[float] = field(default_factory=lambda: [8.0])
    fake_gpu_mig: list[int] = field(default_factory=list)  # simulated GPUs in MIG mode (physical indices)
    fake_gpu_nvlink: list[tuple[int, int]] = field(default_factory=list)  # simulated NVLink pairs, e.g. 0-1
    # the GPUs vllama may use (NVML indices or UUIDs, comma list): wins over vllama's own CUDA_VISIBLE_DEVICES
    # (see vllama/gpu.py); None: CUDA_VISIBLE_DEVICES if set, else every GPU
    devices: str | None = None
    startup_timeout: float = 900.0
    drain_timeout: float = 60.0  # how long an eviction or sleep waits for in-flight requests
    stop_timeout: float = 15.0  # SIGTERM → SIGKILL of a child's process group
    capacity_wait: float = 120.0  # how long a request waits for busy models to free memory
    memory_settle_timeout: float = 20.0  # how long to wait for freed GPU memory to show up in NVML
    shutdown_grace: float = 30.0  # in-flight requests may finish this long after SIGTERM
    # what a sleeping vLLM still holds per device (its CUDA context) until measured: 0.8–1.4 GB on an H100
    sleep_residual_gib: float = 1.0
    keep_alive_interval: float = 5.0  # how often idle models are checked against their keep-alive ladder
    # a sleep or wake that takes longer is abandoned: the child is killed and the model goes to error
    transition_timeout: float = 300.0
    # how long the relay waits for the first byte of vLLM's answer; then a failing health check means the
    # child hangs (it is killed and started afresh) and the client gets a 504
    response_timeout: float = 600.0
    # host memory for level-1 sleepers' weights (default: 80% of MemAvailable when vllama starts)
    host_memory_gib: float | None = None
    keep_alive: KeepAlive = field(default_factory=KeepAlive)
    max_body_bytes: int = 32 * 1024 * 1024
    # optional keys (see vllama/auth.py): the API key guards every route but /health (and the admin routes unless
    # the admin key is set); the admin key guards /vllama/*
    api_key: str | None = field(default=None, repr=False)
    admin_api_key: str | None = field(default=None, repr=False)
    # warm interpreter pool (vllama/pool.py): spares per engine environment (0 = off; None = sized to the host's
    # memory, `pool.default_pool_size`); fork vLLM's EngineCore and workers from the pre-imported server instead
    # of spawning fresh interpreters
    pool_size: int | None = None
    pool_fork: bool = True
    # server modules a spare may pre-import (`PYTHON -m MODULE` commands only)
    pool_modules: tuple[str, ...] = ("vllm.entrypoints.openai.api_server",)
    # memory auto-sizing (vllama/sizing.py) for models without an explicit memory setting
    auto_memory: bool = False
    auto_memory_sequences: int = 4  # KV cache for this many sequences of max_model_len
    # which unconfigured model names a request may start (vllama/model_access.py); auto: none with an API key
    allow_models: AllowModels = field(default_factory=AllowModels)
    start_backoff: float = 10.0  # first delay before a failed start is tried again by a request (doubles, 0 = off)

    @property
    def models_path(self) -> Path:
        return self.home / "models.yaml"

    @property
    def logs_dir(self) -> Path:
        return self.home / "logs"

    @property
    def run_dir(self) -> Path:
        """The folder of the children's Unix sockets (see `socket_dir`)."""
        return socket_dir(self.home)

    @classmethod
    def from_env(cls, **overrides: Any) -> Settings:
        """Settings from the `VLLAMA_*` environment; a bad value is a ConfigError naming the variable."""
        s = cls()
        env = os.environ
        if "VLLAMA_HOST" in env:
            s.host = env["VLLAMA_HOST"]
        # every number has a range, and a value outside it is refused at start with the variable and the range:
        # e.g. a keep-alive interval of 0 would be a busy loop, a NaN wait never ends or never waits
        seconds = _number(0, _YEAR_S, unit="seconds")
        gib = _number(0, 1 << 20, above=True, unit="GiB")
        parsed: dict[str, Any] = {
            "port": _env_value("VLLAMA_PORT", _number(1, 65535, integer=True)),
            "port_range": _env_value("VLLAMA_PORT_RANGE", _port_range),
            "child_transport": _env_value("VLLAMA_CHILD_TRANSPORT", _choice("uds", "tcp")),
            "vllm_command": _env_value("VLLAMA_VLLM_COMMAND", str.split)
            or _env_value("VLLAMA_VLLM_PYTHON", lambda p: [p, "-m", "vllm.entrypoints.openai.api_server"]),
            "gpu_probe": _env_value("VLLAMA_GPU_PROBE", _choice("auto", "nvml", "cpu", "fake")),
            "cpu_memory_gib": _env_value("VLLAMA_CPU_MEMORY_GIB", gib),
            "cpu_default_model_gib": _env_value("VLLAMA_CPU_DEFAULT_MODEL_GIB", gib),
            "fake_gpu_ledger": _env_value("VLLAMA_FAKE_GPU_LEDGER", Path),
            "fake_gpu_total_gib": _env_value("VLLAMA_FAKE_GPU_TOTAL_GIB", lambda v: [gib(x) for x in v.split(",")]),
            "fake_gpu_mig": _env_value("VLLAMA_FAKE_GPU_MIG", lambda v: [int(x) for x in v.split(",")]),
            "fake_gpu_nvlink": _env_value("VLLAMA_FAKE_GPU_NVLINK", _pairs),
            "devices": os.environ.get("VLLAMA_DEVICES") or None,
            "keep_alive": _env_value("VLLAMA_KEEP_ALIVE", _keep_alive),
            "max_body_bytes": _env_value("VLLAMA_MAX_BODY_BYTES", _number(1, 1 << 40, integer=True, unit="bytes")),
            "pool_size": _env_value("VLLAMA_POOL_SIZE", _number(0, 64, integer=True)),
            "pool_fork": _env_value("VLLAMA_POOL_FORK", _flag),
            "pool_modules": _env_value(
                "VLLAMA_POOL_MODULES", lambda v: tuple(m.strip() for m in v.split(",") if m.strip())
            ),
            "auto_memory": _env_value("VLLAMA_AUTO_MEMORY", _flag),
            "auto_memory_sequences": _env_value("VLLAMA_AUTO_MEMORY_SEQUENCES", _number(1, 65536, integer=True)),
            "api_key": _secret_env("VLLAMA_API_KEY"),
            "admin_api_key": _secret_env("VLLAMA_ADMIN_API_KEY"),
            "startup_timeout": _env_value("VLLAMA_STARTUP_TIMEOUT", _number(0, _YEAR_S, above=True, unit="seconds")),
            "drain_timeout": _env_value("VLLAMA_DRAIN_TIMEOUT", seconds),
            "stop_timeout": _env_value("VLLAMA_STOP_TIMEOUT", seconds),
            "capacity_wait": _env_value("VLLAMA_CAPACITY_WAIT", seconds),
            "memory_settle_timeout": _env_value("VLLAMA_MEMORY_SETTLE_TIMEOUT", seconds),
            "shutdown_grace": _env_value("VLLAMA_SHUTDOWN_GRACE", seconds),
            "sleep_residual_gib": _env_value("VLLAMA_SLEEP_RESIDUAL_GIB", _number(0, 1024, unit="GiB")),
            "allow_models": _env_value("VLLAMA_ALLOW_MODELS", parse_allow_models),
            "start_backoff": _env_value("VLLAMA_START_BACKOFF", _number(0, 3600, unit="seconds")),
            # below 0.1 s the keep-alive pass would spin on the event loop
            "keep_alive_interval": _env_value("VLLAMA_KEEP_ALIVE_INTERVAL", _number(0.1, 86400, unit="seconds")),
            "transition_timeout": _env_value(
                "VLLAMA_TRANSITION_TIMEOUT", _number(0, _YEAR_S, above=True, unit="seconds")
            ),
            "response_timeout": _env_value("VLLAMA_RESPONSE_TIMEOUT", _number(0, _YEAR_S, above=True, unit="seconds")),
            "host_memory_gib": _env_value("VLLAMA_HOST_MEMORY_GIB", _number(0, 1 << 20, unit="GiB")),
        }
        for key, value in [*parsed.items(), *overrides.items()]:
            if value is not None:
                setattr(s, key, value)
        # the command line's values (overrides) are checked like the environment's
        if not 1 <= s.port <= 65535:
            raise ConfigError(f"port {s.port} is invalid (--port / VLLAMA_PORT): allowed: 1 to 65535")
        if s.log_level.lower() not in _LOG_LEVELS:
            raise ConfigError(f"log level {s.log_level!r} is invalid (--log-level): allowed: {', '.join(_LOG_LEVELS)}")
        return s
