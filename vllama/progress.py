"""The stages of a vLLM start, read from its log (pure: no I/O), for `vllama start`'s progress display.

vLLM's start-up goes through recognisable log lines; which of them appear depends on the version, the device
(the CPU build compiles but captures no CUDA graphs) and flags (`--enforce-eager` skips compiling and graphs).
A stage that never shows is simply not displayed: the display is a checklist of what was seen, in order.
"""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class Stage:
    key: str
    label: str  # what the display says once the stage is reached
    pattern: re.Pattern[str]


STAGES = (
    Stage("spawned", "vLLM process spawned", re.compile(r"vLLM API server version|non-default args|Initializing")),
    Stage(
        "loading",
        "loading weights",
        re.compile(r"Starting to load model|Loading weights(?! took)|Loading safetensors checkpoint shards"),
    ),
    Stage("loaded", "weights loaded", re.compile(r"Loading weights took|Model loading took")),
    Stage(
        "compiling",
        "compiling (torch.compile)",
        re.compile(r"torch\.compile|Dynamo bytecode transform|Compiling a graph"),
    ),
    Stage("kv_cache", "KV cache allocated", re.compile(r"Available KV cache memory|GPU KV cache size|KV cache size")),
    Stage("graphs", "capturing CUDA graphs", re.compile(r"Capturing CUDA graph")),
    Stage("graphs_done", "CUDA graphs captured", re.compile(r"Graph capturing finished")),
    Stage("server", "API server starting", re.compile(r"Starting vLLM API server")),
    Stage("ready", "API server up", re.compile(r"Application startup complete")),
)
_BY_KEY = {s.key: i for i, s in enumerate(STAGES)}


def _clean(line: str) -> str:
    """A log line without vLLM's prefix (`INFO 11-25 12:00:00 [file.py:12] `), for display."""
    return re.sub(r"^(?:\(\w+ pid=\d+\)\s*)?(?:[A-Z]+ \d\d-\d\d [\d:]+ \[[^\]]*\]\s*)?", "", line.strip())


def scan(text: str) -> list[tuple[str, str]]:
    """The stages that `text` (log lines) shows, in the order they appear: (stage key, the line, cleaned)."""
    found = []
    for line in text.splitlines():
        for stage in STAGES:
            if stage.pattern.search(line):
                found.append((stage.key, _clean(line)))
                break
    return found


class Progress:
    """Stages reached so far (each once), fed with log text as it grows."""

    def __init__(self) -> None:
        self.reached: dict[str, tuple[float, str]] = {}  # key → (elapsed seconds, line)
        self.last_line = ""

    def feed(self, text: str, elapsed: float) -> list[tuple[str, str]]:
        """New stages in `text` (each only the first time), as (label, line)."""
        new = []
        for key, line in scan(text):
            if key not in self.reached:
                self.reached[key] = (elapsed, line)
                new.append((STAGES[_BY_KEY[key]].label, line))
        lines = [ln for ln in text.splitlines() if ln.strip()]
        if lines:
            self.last_line = _clean(lines[-1])
        return new

    @property
    def fraction(self) -> float:
        """How far along the start is, by the furthest stage reached (0 before any)."""
        if not self.reached:
            return 0.0
        return (max(_BY_KEY[k] for k in self.reached) + 1) / (len(STAGES) + 1)  # +1: vllama's own warm-up

    @property
    def current(self) -> str:
        if not self.reached:
            return "waiting for vLLM"
        return STAGES[max(_BY_KEY[k] for k in self.reached)].label


def bar(fraction: float, width: int = 20) -> str:
    filled = round(max(0.0, min(1.0, fraction)) * width)
    return "█" * filled + "░" * (width - filled)
