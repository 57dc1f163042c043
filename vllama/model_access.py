"""Which model names a request may start when models.yaml does not configure them, and the back-off after a
failed start.

- `AllowModels` is the setting `VLLAMA_ALLOW_MODELS`: `auto` (the default), `any`, `configured`, or a
  comma-separated list of patterns (`Qwen/*`, `meta-llama/Llama-3.2-1B`, a folder such as `/models` or
  `~/models`). Configured names and aliases are always allowed; `configured` allows nothing else; patterns
  allow the Hugging Face ids they match (`fnmatch`, case-sensitive) and the local models inside the folders
  they name. `auto` is `configured` when the daemon has an API key and `any` otherwise: without a key the admin
  API (`/vllama/assign` writes models.yaml) is open to the same clients, so a name restriction would stop no
  one, and the spec's first example starts an unconfigured Hugging Face id on a keyless daemon.
- `unconfigured_source` decides for one requested name: what vLLM should load (`~` expanded), or an error
  that says why not (404: not a model name or not a model folder; 403: not allowed here).
- `StartBackoff` keeps, per model, the consecutive failed starts: a request for a model whose start just
  failed gets that failure again (503) instead of a new start that would evict idle models again, until a
  delay that doubles with each failure (from `VLLAMA_START_BACKOFF`, capped at 5 minutes) has passed.

Pure but for a few bounded filesystem reads of a requested local path; the clock is the caller's.
"""

from __future__ import annotations

import fnmatch
import os
import re
from dataclasses import dataclass, field
from typing import Literal

from vllama.errors import ModelNotAllowed, ModelNotFound, ModelUnavailable

HF_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
# a folder is a model when one of these is in it (Hugging Face / Mistral checkpoints), or a .gguf file is
_MODEL_MARKERS = ("config.json", "params.json")
_SCAN_LIMIT = 1000  # entries of a folder looked at for a .gguf file: a request must not make vllama list "/"
MAX_BACKOFF_S = 300.0


@dataclass(frozen=True)
class AllowModels:
    mode: Literal["auto", "any", "listed"] = "auto"
    patterns: tuple[str, ...] = ()  # with "listed": what is allowed beyond models.yaml's names

    def restricted(self, *, has_api_key: bool) -> bool:
        return self.mode == "listed" or (self.mode == "auto" and has_api_key)

    def describe(self) -> str:
        if self.mode != "listed":
            return self.mode
        return ",".join(self.patterns) or "configured"


def parse_allow_models(raw: str) -> AllowModels:
    """`VLLAMA_ALLOW_MODELS`'s value; a ValueError says what is accepted."""
    value = raw.strip()
    if value.lower() in ("auto", "any", "configured"):
        mode = value.lower()
        return AllowModels() if mode == "auto" else AllowModels("any") if mode == "any" else AllowModels("listed")
    patterns = tuple(p.strip() for p in value.split(",") if p.strip())
    if not patterns:
        raise ValueError("expected auto, any, configured, or comma-separated patterns (Qwen/*, /models)")
    for pattern in patterns:
        if not (pattern.startswith(("/", "~")) or "/" in pattern):
            raise ValueError(f"pattern {pattern!r} is neither an org/name pattern (Qwen/*) nor a folder (/models)")
    return AllowModels("listed", patterns)


def _is_path(name: str) -> bool:
    return name.startswith(("/", "~"))


def _real(path: str) -> str | None:
    """The absolute path with `~` expanded, `..` and symlinks resolved; None for what is no path at all."""
    try:
        return os.path.realpath(os.path.expanduser(path))
    except (RuntimeError, ValueError, OSError):  # an embedded NUL, a name too long, a symlink loop
        return None


def looks_like_model(path: str) -> bool:
    """A .gguf file, or a folder holding a config.json / params.json or a .gguf file (bounded look)."""
    try:
        if os.path.isfile(path):
            return path.endswith(".gguf")
        if not os.path.isdir(path):
            return False
        if any(os.path.isfile(os.path.join(path, marker)) for marker in _MODEL_MARKERS):
            return True
        with os.scandir(path) as entries:
            for i, entry in enumerate(entries):
                if i >= _SCAN_LIMIT:
                    return False
                if entry.name.endswith(".gguf"):
                    return True
    except (OSError, ValueError):  # unreadable, or a name the OS refuses
        return False
    return False


def _inside(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip("/") + "/")


def _pattern_allows(name: str, real: str | None, pattern: str) -> bool:
    if not _is_path(pattern):
        return real is None and fnmatch.fnmatchcase(name, pattern)
    folder = _real(pattern)
    if real is None or folder is None:
        return False
    return _inside(real, folder) or fnmatch.fnmatchcase(real, folder)


def unconfigured_source(name: str, allow: AllowModels, *, has_api_key: bool, configured: str) -> str:
    """What vLLM loads for a requested name that models.yaml does not configure: the Hugging Face id, or the
    local model's path with `~` expanded. Raises ModelNotFound (not a model name / not a model), or
    ModelNotAllowed (a model this daemon's VLLAMA_ALLOW_MODELS does not admit). `configured` lists the
    configured names for the message."""
    real: str | None = None
    if _is_path(name):
        real = _real(name)
        if real is None or not os.path.exists(real):
            raise ModelNotFound(
                f"model {name!r} is not configured and no such path exists. Configured: {configured}", param="model"
            )
        if not looks_like_model(real):
            raise ModelNotFound(
                f"model {name!r} is a path but not a model: a local model is a folder with a config.json (or "
                f"params.json, or a .gguf file) or a .gguf file. Configured models: {configured}",
                param="model",
            )
        source = os.path.expanduser(name)  # vLLM gets no shell: `~` must be expanded here
    elif HF_ID.match(name):
        source = name
    else:
        raise ModelNotFound(
            f"model {name!r} is not configured, is not a local path and not a Hugging Face id (org/name). "
            f"Configured models: {configured}",
            param="model",
        )
    if allow.restricted(has_api_key=has_api_key) and not any(_pattern_allows(name, real, p) for p in allow.patterns):
        raise ModelNotAllowed(
            f"model {name!r} is not configured, and this vllama starts only the models of models.yaml"
            + (f" and those matching {', '.join(allow.patterns)}" if allow.patterns else "")
            + f" (VLLAMA_ALLOW_MODELS={allow.describe()}). Configured models: {configured}",
            param="model",
        )
    return source


@dataclass
class _Failures:
    count: int
    until: float
    message: str


@dataclass
class StartBackoff:
    """Consecutive failed starts per model, and until when requests get the last failure instead of a new
    start. `base` 0 turns it off. The state machine's own error stays the source of truth for `ps`; this only
    decides whether a request may try again yet."""

    base: float = 10.0
    _failures: dict[str, _Failures] = field(default_factory=dict)

    def check(self, name: str, now: float) -> None:
        """Raise ModelUnavailable while `name` is backing off after a failed start."""
        failed = self._failures.get(name)
        if failed is None or now >= failed.until:
            return
        raise ModelUnavailable(
            f"{name} failed to start {failed.count} time(s) in a row; the next try is in {failed.until - now:.0f} s "
            f"(`vllama start {name}` tries now). Last error: {failed.message}"
        )

    def record(self, name: str, *, failed: bool, message: str | None, now: float) -> None:
        """After a start attempt: a success forgets the failures, a failure pushes the next try back."""
        if not failed:
            self._failures.pop(name, None)
            return
        if self.base <= 0:
            return
        count = self._failures[name].count + 1 if name in self._failures else 1
        delay = min(self.base * 2 ** min(count - 1, 20), max(MAX_BACKOFF_S, self.base))
        self._failures[name] = _Failures(count, now + delay, message or "(no message)")
