"""The `vllama` command: `serve` runs the daemon; every other command talks to it over HTTP."""

from __future__ import annotations

import json
import sys
import time
import unicodedata
from datetime import datetime
from typing import Any, NoReturn

import typer

from vllama.client import Client, DaemonError, DaemonNotRunning

app = typer.Typer(add_completion=True, no_args_is_help=True, help="An Ollama-style manager for vLLM.")

URL_OPTION = typer.Option(None, "--url", help="daemon URL (default $VLLAMA_URL or http://127.0.0.1:33258)")


def _client(url: str | None) -> Client:
    return Client(url)


def _fail(message: str) -> NoReturn:
    typer.echo(f"Error: {message}", err=True)
    raise typer.Exit(1)


def _gib(n: int | None) -> str:
    return "-" if n is None else f"{n / 1024**3:.1f}G"


@app.command()
def serve(
    host: str = typer.Option(None, help="address to listen on (default 0.0.0.0)"),
    port: int = typer.Option(None, help="port to listen on (default 33258)"),
    log_level: str = typer.Option("info", help="debug, info, warning or error"),
) -> None:
    """Run the vllama daemon (OpenAI API + admin API) in the foreground."""
    from vllama.config import Settings, load_models_file
    from vllama.errors import ConfigError
    from vllama.server import serve as run

    try:
        settings = Settings.from_env(host=host, port=port, log_level=log_level)
        load_models_file(settings.models_path)  # refuse to start on a bad models.yaml, with its message
    except ConfigError as exc:
        _fail(str(exc))
    run(settings)


@app.command()
def info(url: str = URL_OPTION) -> None:
    """Show the daemon's address, configuration, devices and health."""
    data = _client(url).info()
    typer.echo(f"vllama {data['version']} at {_client(url).url} (listening on {data['host']}:{data['port']})")
    typer.echo(f"health:        {data['health']}, up {data['uptime_seconds']:.0f} s")
    typer.echo(f"home:          {data['home']}")
    typer.echo(f"models file:   {data['models_file']}")
    if data.get("config_error"):
        typer.echo(f"config error:  {data['config_error']} (the last good configuration is in use)")
    typer.echo(f"configured:    {', '.join(data['configured_models']) or '(none)'}")
    typer.echo(f"devices ({data['device_kind']}, sleep mode {'on' if data['sleep_mode'] else 'unavailable'}):")
    for d in data["devices"]:
        typer.echo(
            f"  [{d['index']}] {d['name']}: {_gib(d['free_bytes'])} free of {_gib(d['total_bytes'])}"
            f" ({_gib(d['available_bytes'])} unreserved); models: {', '.join(d['models']) or '-'}"
        )
    typer.echo(
        f"evictions:     {data['evictions']}" + (f", last: {data['last_eviction']}" if data["last_eviction"] else "")
    )


def _width(text: str) -> int:
    """Columns `text` takes in a terminal: East Asian wide characters take two."""
    return sum(2 if unicodedata.east_asian_width(ch) in "WF" else 1 for ch in text)


def _format_ps(rows: list[dict[str, Any]]) -> str:
    headers = ["MODEL", "STATE", "PORT", "PID", "DEVICES", "MEMORY", "IN-FLIGHT", "LAST ACCESS", "IDLE"]
    table = [headers]
    for r in rows:
        state = r["state"] + (f" (L{r['sleep_level']})" if r.get("sleep_level") else "")
        memory = r.get("memory_bytes") or {}
        table.append(
            [
                r["model"],
                state,
                str(r["port"] or "-"),
                str(r["pid"] or "-"),
                ",".join(str(d) for d in r["devices"]) or "-",
                "+".join(_gib(v) for v in memory.values()) or "-",
                str(r["in_flight"]),
                datetime.fromtimestamp(r["last_access"]).strftime("%Y-%m-%d %H:%M:%S"),
                f"{r['idle_seconds']:.0f}s",
            ]
        )
    widths = [max(_width(row[i]) for row in table) for i in range(len(headers))]
    lines = [
        "  ".join(cell + " " * (w - _width(cell)) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in table
    ]
    for r in rows:
        if r.get("last_error"):
            lines.append(f"! {r['model']}: {r['last_error']}")
    return "\n".join(lines)


@app.command()
def ps(url: str = URL_OPTION, as_json: bool = typer.Option(False, "--json", help="print JSON")) -> None:
    """List model instances: state, port, pid, devices, memory, in-flight requests, last access."""
    data = _client(url).ps()
    if as_json:
        typer.echo(json.dumps(data, indent=2))
        return
    if not data["models"]:
        typer.echo("no model instances (a request or `vllama start MODEL` starts one)")
        return
    typer.echo(_format_ps(data["models"]))


@app.command()
def start(model: str, url: str = URL_OPTION) -> None:
    """Start (or wake) MODEL and wait until it is ready, showing progress."""
    client = _client(url)
    snap = client.start(model, wait=False)
    t0 = time.monotonic()
    shown_log = False
    tty = sys.stdout.isatty()
    last_line = ""
    last_shown: tuple[str, str] | None = None
    while True:
        if snap.get("log") and not shown_log:
            typer.echo(f"Logs: {snap['log']}")
            shown_log = True
        state = snap["state"]
        if state == "running":
            if tty:
                typer.echo()
            typer.echo(f"{snap['model']} is running on port {snap['port']} (ready after {time.monotonic() - t0:.1f} s)")
            return
        if state in ("error", "stopped") and time.monotonic() - t0 > 1.0:
            if tty:
                typer.echo()
            _fail(snap.get("last_error") or f"{model} is {state}")
        if snap.get("log"):
            try:
                lines = client.logs(model, 1)["lines"]
                last_line = lines.splitlines()[-1][-100:] if lines else last_line
            except DaemonError:
                pass
        progress = f"[{time.monotonic() - t0:6.1f}s] {state}: {last_line}"
        if tty:
            typer.echo("\r" + progress.ljust(120)[:120], nl=False)
        elif (state, last_line) != last_shown:  # a log or a pipe gets a line per change, not per poll
            typer.echo(progress)
            last_shown = (state, last_line)
        time.sleep(0.25)  # a level-1 wake takes ~0.1 s: poll often enough not to add seconds to it
        rows = [r for r in client.ps()["models"] if r["model"] == snap["model"]]
        snap = rows[0] if rows else snap


@app.command()
def stop(model: str, url: str = URL_OPTION) -> None:
    """Stop MODEL (also clears an error or a stuck start)."""
    snap = _client(url).stop(model)
    typer.echo(f"{snap['model']} is {snap['state']}")


@app.command()
def sleep(
    model: str,
    level: int = typer.Option(2, "--level", min=1, max=3, help="1: offload weights to CPU RAM; 2: drop them; 3: stop"),
    url: str = URL_OPTION,
) -> None:
    """Put MODEL to sleep (default level 2)."""
    snap = _client(url).sleep(model, level)
    if snap.get("note"):
        typer.echo(f"Note: {snap['note']}")
    suffix = f" (level {snap['sleep_level']})" if snap.get("sleep_level") else ""
    typer.echo(f"{snap['model']} is {snap['state']}{suffix}")


@app.command()
def assign(
    model: str,
    devices: str = typer.Option(None, "--devices", help="comma-separated device indices, e.g. 0 or 0,1"),
    gpu_memory: float = typer.Option(None, "--gpu-memory", help="fraction of each device's memory (0-1]"),
    gpu_memory_gib: float = typer.Option(None, "--gpu-memory-gib", help="memory per device in GiB"),
    max_model_len: int = typer.Option(None, "--max-model-len"),
    keep_alive: str = typer.Option(None, "--keep-alive", help="stop after this idle time (e.g. 30m, -1 never)"),
    pinned: bool = typer.Option(None, "--pinned/--unpinned", help="never evict or unload this model"),
    restart: bool = typer.Option(False, "--restart", help="restart the model if it is running"),
    url: str = URL_OPTION,
) -> None:
    """Change MODEL's settings in models.yaml (and optionally restart it)."""
    settings: dict[str, Any] = {"restart": restart}
    if devices is not None:
        try:
            settings["devices"] = [int(d) for d in devices.split(",") if d.strip()]
        except ValueError:
            _fail(f"--devices must be comma-separated integers, got {devices!r}")
    for key, value in (
        ("gpu_memory_utilization", gpu_memory),
        ("gpu_memory_gib", gpu_memory_gib),
        ("max_model_len", max_model_len),
        ("keep_alive", keep_alive),
        ("pinned", pinned),
    ):
        if value is not None:
            settings[key] = value
    result = _client(url).assign(model, **settings)
    typer.echo(f"{result['model']}: {json.dumps(result['config'])}" + (" (restarted)" if result["restarted"] else ""))


@app.command()
def logs(model: str, lines: int = typer.Option(50, "-n", help="number of lines"), url: str = URL_OPTION) -> None:
    """Print the end of MODEL's vLLM log."""
    data = _client(url).logs(model, lines)
    typer.echo(f"# {data['log']}")
    typer.echo(data["lines"])


def main() -> None:
    try:
        app()
    except DaemonNotRunning as exc:
        typer.echo(f"Error: {exc}", err=True)
        sys.exit(1)
    except DaemonError as exc:
        typer.echo(f"Error: {exc.message}", err=True)
        sys.exit(1)
