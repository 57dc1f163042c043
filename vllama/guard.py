"""A tiny supervisor that sits between vllama and one vLLM server, so no vLLM process outlives vllama.

vllama starts `python -m vllama.guard --parent PID -- CMD...` as the leader of a new session; the guard starts
CMD in that same process group and stays its parent. vLLM's API server spawns an EngineCore (which holds all
the GPU memory) and more helpers; SIGKILL to the API server alone leaves them running. So the guard:
- on SIGTERM/SIGINT, or when vllama dies (PR_SET_PDEATHSIG, plus polling the parent pid), sends SIGTERM to the
  API server, waits for it (`--grace` seconds), then SIGKILLs the whole group;
- when the API server exits by itself, SIGKILLs whatever it left in the group and exits with its exit code;
- if the guard itself is SIGKILLed (say `pkill -9 -f vllama`, which takes vllama and every guard at once), the
  API server gets SIGTERM from the kernel (PR_SET_PDEATHSIG set for it too) and stops its EngineCore.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import time

PR_SET_PDEATHSIG = 1


def _set_parent_death_signal(sig: int) -> None:
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0)


def _kill_rest_of_group() -> None:
    """SIGKILL every process of our group but ourselves."""
    me = os.getpid()
    pgid = os.getpgid(0)
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        with contextlib.suppress(OSError):
            if os.getpgid(int(entry)) == pgid:
                os.kill(int(entry), signal.SIGKILL)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vllama.guard")
    parser.add_argument("--parent", type=int, required=True, help="pid whose death stops the server")
    parser.add_argument("--grace", type=float, default=10.0, help="seconds between SIGTERM and SIGKILL")
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no command given")

    stop_requested = False

    def on_signal(signum: int, frame: object) -> None:
        nonlocal stop_requested
        stop_requested = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGHUP, on_signal)
    _set_parent_death_signal(signal.SIGTERM)
    if os.getppid() != args.parent:  # the parent died before prctl took effect
        return 1

    # same process group as the guard; the server stops if the guard dies without a chance to stop it
    child = subprocess.Popen(command, preexec_fn=lambda: _set_parent_death_signal(signal.SIGTERM))
    while child.poll() is None:
        if stop_requested or os.getppid() != args.parent:
            child.terminate()
            deadline = time.monotonic() + args.grace
            while child.poll() is None and time.monotonic() < deadline:
                time.sleep(0.05)
            break
        time.sleep(0.1)
    _kill_rest_of_group()
    code = child.wait()
    return code if code >= 0 else 128 - code


if __name__ == "__main__":
    sys.exit(main())
