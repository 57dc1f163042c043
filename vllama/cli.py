"""The `vllama` command: `serve` runs the daemon; every other command talks to it over HTTP."""

from __future__ import annotations

import json
import signal
import sys
import time
import unicodedata
from datetime import datetime
from pathlib import Path
from typing import Any, NoReturn

import typer

from vllama.client import Client, DaemonError, DaemonNotRunning
from vllama.progress import Progress, bar

app = typer.Typer(add_completion=True, no_args_is_help=True, help="An Ollama-style manager for vLLM.")

URL_OPTION = typer.Option(None, "--url", help="daemon URL (default $VLLAMA_URL or http://127.0.0.1:33258)")


def _complete_models(ctx: typer.Context, incomplete: str) -> list[str]:
    """Shell completion of MODEL: the configured models and the running instances of the daemon, if it answers."""
    try:
        client = Client(ctx.params.get("url"), timeout=1.0)
        names = set(client.info().get("configured_models") or [])
        names.update(str(r["model"]) for r in client.ps().get("models") or [])
    except Exception:  # completion must never print a traceback into the shell
        return []
    return sorted(n for n in names if n.startswith(incomplete))


MODEL_ARG = typer.Argument(..., help="a models.yaml name or alias, a Hugging Face id, or a local path",
                           autocompletion=_complete_models)  # fmt: skip


_api_key: str | None = None  # from the global --api-key option


@app.callback()
def _global_options(
    api_key: str = typer.Option(
        None,
        "--api-key",
        help="key for a daemon started with VLLAMA_API_KEY / VLLAMA_ADMIN_API_KEY (default: those variables)",
    ),
) -> None:
    global _api_key
    _api_key = api_key


def _client(url: str | None) -> Client:
    return Client(url, api_key=_api_key)


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
    if settings.child_transport == "uds":
        from vllama.engine import EngineError, private_dir

        try:  # a socket folder that another user owns is refused here, with its reason (not a traceback)
            if private_dir(settings.run_dir):
                typer.echo(f"warning: {settings.run_dir} was open to other users: its mode is now 0700", err=True)
        except (EngineError, OSError) as exc:
            _fail(f"cannot use {settings.run_dir} for the vLLM children's sockets: {exc}")
    run(settings)


@app.command()
def info(url: str = URL_OPTION) -> None:
    """Show the daemon's address, configuration, devices and health."""
    data = _client(url).info()
    typer.echo(f"vllama {data['version']} at {_client(url).url} (listening on {data['host']}:{data['port']})")
    typer.echo(f"health:        {data['health']}, up {data['uptime_seconds']:.0f} s")
    typer.echo(f"home:          {data['home']}")
    typer.echo(f"models file:   {data['models_file']}")
    if data.get("child_transport") == "uds":
        typer.echo(f"children:      on Unix sockets in {data['socket_dir']} (only vllama's user can open it)")
    elif data.get("child_transport") == "tcp":
        lo, hi = data["port_range"]
        typer.echo(
            f"children:      on 127.0.0.1 ports {lo}-{hi} (VLLAMA_CHILD_TRANSPORT=tcp: open to every local user)"
        )
    if data.get("config_error"):
        typer.echo(f"config error:  {data['config_error']} (the last good configuration is in use)")
    typer.echo(f"configured:    {', '.join(data['configured_models']) or '(none)'}")
    typer.echo(f"devices ({data['device_kind']}, sleep mode {'on' if data['sleep_mode'] else 'unavailable'}):")
    for d in data["devices"]:
        typer.echo(
            f"  [{d['index']}] {d['name']}: {_gib(d['free_bytes'])} free of {_gib(d['total_bytes'])}"
            f" ({_gib(d['available_bytes'])} unreserved); models: {', '.join(d['models']) or '-'}"
        )
    host = data.get("host_memory")
    if host:
        typer.echo(
            f"host memory:   {_gib(host['l1_bytes'])} of {_gib(host['budget_bytes'])} held by level-1 sleepers' "
            f"weights (VLLAMA_HOST_MEMORY_GIB; past it, evictions sleep at level 2)"
        )
    typer.echo(
        f"evictions:     {data['evictions']}" + (f", last: {data['last_eviction']}" if data["last_eviction"] else "")
    )
    for stray in data.get("strays") or []:
        where = f"socket {stray['socket']}" if stray.get("socket") else f"port {stray['port']}"
        typer.echo(
            f"stray:         pid {stray['pid']} on {where} ({stray['kind']}), not started by this "
            f"vllama: left alone, its address skipped: {stray['cmdline'][:100]}"
        )
    pool = data.get("warm_pool")
    if pool and pool.get("size"):
        ready = sum(1 for s in pool["spares"] if s["state"] == "ready")
        typer.echo(
            f"warm pool:     {ready} ready, {len(pool['spares']) - ready} importing; {pool['pooled_starts']} pooled "
            f"and {pool['plain_starts']} plain starts"
            + (f" (last plain: {pool['last_fallback']})" if pool.get("last_fallback") else "")
        )


def _width(text: str) -> int:
    """Columns `text` takes in a terminal: East Asian wide characters take two."""
    return sum(2 if unicodedata.east_asian_width(ch) in "WF" else 1 for ch in text)


def _address(row: dict[str, Any]) -> str:
    """Where a child listens, short: its socket's file name (the folder is in `vllama info`), or its port."""
    if row.get("socket"):
        return Path(row["socket"]).name
    return str(row.get("port") or "-")


def _format_ps(rows: list[dict[str, Any]]) -> str:
    headers = ["MODEL", "STATE", "ADDRESS", "PID", "DEVICES", "MEMORY", "IN-FLIGHT", "LAST ACCESS", "IDLE"]
    table = [headers]
    for r in rows:
        state = r["state"] + (f" (L{r['sleep_level']})" if r.get("sleep_level") else "")
        memory = r.get("memory_bytes") or {}
        table.append(
            [
                r["model"],
                state,
                _address(r),
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
        if r.get("host_memory_bytes"):
            lines.append(f"  {r['model']}: {_gib(r['host_memory_bytes'])} of host memory (its weights, asleep at L1)")
        if r.get("memory_sizing"):
            lines.append(f"  {r['model']}: {r['memory_sizing']}")
        for a in r.get("adapters") or []:
            busy = f", {a['in_flight']} in flight" if a["in_flight"] else ""
            lines.append(f"  {r['model']} + adapter {a['name']}: {'loaded' if a['loaded'] else 'not loaded'}{busy}")
    return "\n".join(lines)


@app.command()
def ps(url: str = URL_OPTION, as_json: bool = typer.Option(False, "--json", help="print JSON")) -> None:
    """List model instances: state, address (socket or port), pid, devices, memory, in-flight requests, last access."""
    data = _client(url).ps()
    if as_json:
        typer.echo(json.dumps(data, indent=2))
        return
    if not data["models"]:
        typer.echo("no model instances (a request or `vllama start MODEL` starts one)")
        return
    typer.echo(_format_ps(data["models"]))
    host = data.get("host_memory")
    if host and host["l1_bytes"]:
        typer.echo(f"host memory: {_gib(host['l1_bytes'])} of {_gib(host['budget_bytes'])} held by level-1 sleepers")


@app.command()
def start(model: str = MODEL_ARG, url: str = URL_OPTION) -> None:
    """Start (or wake) MODEL and wait until it is ready, showing the stages of vLLM's start-up."""
    client = _client(url)
    _follow_start(client, model, client.start(model, wait=False), verbose=True)


_SPINNER = "⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏"


def _follow_start(client: Client, model: str, snap: dict[str, Any], *, verbose: bool) -> dict[str, Any]:
    """Poll until MODEL runs (returns its `ps` row) or failed (exits 1), reading the stages of the start from
    its vLLM log. `verbose` (`vllama start`): the log path, a line per stage reached and, on a terminal, a
    progress line, on stdout. Otherwise (`vllama run`): only a progress line on a terminal's stderr."""
    stream = sys.stdout if verbose else sys.stderr
    tty = stream.isatty()
    fancy = tty and (getattr(stream, "encoding", "") or "").lower().replace("-", "") == "utf8"
    t0 = time.monotonic()
    progress, log_path, offset, shown_log = Progress(), None, 0, None
    last_shown: tuple[str, str] | None = None
    polls = 0

    def echo(text: str, nl: bool = True) -> None:
        typer.echo(text, nl=nl, err=not verbose)

    def clear() -> None:
        if tty:
            echo("\r" + " " * 120 + "\r", nl=False)

    def read_log() -> None:
        nonlocal offset
        try:
            data = client.logs_from(model, offset)
        except DaemonError:
            return
        if data.get("log") == log_path:
            offset = data["offset"]
            for label, line in progress.feed(data["lines"], elapsed):
                if verbose:
                    clear()
                    echo(f"  {'✓' if fancy else '-'} {label:<26} {elapsed:6.1f}s  {line[:80]}")

    while True:
        state, elapsed = snap["state"], time.monotonic() - t0
        if verbose and snap.get("log") and snap["log"] != shown_log:
            clear()
            echo(f"Logs: {snap['log']}")
            shown_log = snap["log"]
        if state == "running":
            if log_path is not None and snap.get("log") == log_path:
                read_log()  # the stages passed since the last poll
            clear()
            if verbose:
                where = f"socket {snap['socket']}" if snap.get("socket") else f"port {snap['port']}"
                echo(f"{snap['model']} is running on {where} (ready after {elapsed:.1f} s)")
            return snap
        if state in ("error", "stopped") and elapsed > 1.0:
            clear()
            _fail(snap.get("last_error") or f"{model} is {state}")
        if state == "starting" and snap.get("log"):
            if snap["log"] != log_path:
                progress, log_path, offset = Progress(), snap["log"], 0
            read_log()
        doing = progress.current if state == "starting" else state
        if state == "waking" and snap.get("sleep_level"):
            doing = f"waking from sleep level {snap['sleep_level']}"
        if tty:
            spin = _SPINNER[polls % len(_SPINNER)] if fancy else "-\\|/"[polls % 4]
            meter = bar(progress.fraction) if fancy else ""
            detail = f": {progress.last_line}" if verbose and state == "starting" and progress.last_line else ""
            echo("\r" + f"{spin} [{elapsed:6.1f}s] {meter} {doing}{detail}"[:119].ljust(119), nl=False)
        elif verbose and (state, doing) != last_shown:  # a log or a pipe gets a line per change, not per poll
            echo(f"[{elapsed:6.1f}s] {state}: {doing}")
            last_shown = (state, doing)
        polls += 1
        time.sleep(0.25)  # a level-1 wake takes ~0.1 s: poll often enough not to add seconds to it
        rows = [r for r in client.ps()["models"] if r["model"] == snap["model"]]
        snap = rows[0] if rows else snap


@app.command()
def stop(model: str = MODEL_ARG, url: str = URL_OPTION) -> None:
    """Stop MODEL (also clears an error or a stuck start)."""
    snap = _client(url).stop(model)
    typer.echo(f"{snap['model']} is {snap['state']}")


@app.command()
def sleep(
    model: str = MODEL_ARG,
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
    model: str = MODEL_ARG,
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
def logs(
    model: str = MODEL_ARG,
    lines: int = typer.Option(50, "-n", "--lines", help="number of lines"),
    follow: bool = typer.Option(False, "-f", "--follow", help="then print new lines as vLLM writes them (Ctrl-C ends)"),
    url: str = URL_OPTION,
) -> None:
    """Print the end of MODEL's vLLM log (-f: and follow it, across restarts)."""
    if follow:
        # Ctrl-C ends it at once, whatever it is doing (between polls, or waiting for the daemon's answer), also
        # where SIGINT came in ignored: a job that a non-interactive shell starts in the background gets it so,
        # and Python then installs no KeyboardInterrupt handler of its own
        signal.signal(signal.SIGINT, signal.default_int_handler)
    client = _client(url)
    try:
        data = client.logs(model, lines)
        typer.echo(f"# {data['log']}")
        typer.echo(data["lines"])
        if follow:
            _follow_log(client, model, data["log"], int(data.get("offset") or 0))
    except KeyboardInterrupt:
        if not follow:
            raise
        return


def _follow_log(client: Client, model: str, path: str, offset: int) -> None:
    """Print the log's new lines as they come, forever (until Ctrl-C); a restart's new log file is followed."""
    while True:
        time.sleep(0.5)
        new = client.logs_from(model, offset)
        if new["log"] != path:  # restarted: a new log file
            path = new["log"]
            typer.echo(f"# {path}")
            new = client.logs_from(model, 0)
        offset = new["offset"]
        if new["lines"]:
            typer.echo(new["lines"], nl=False)


@app.command()
def run(
    model: str = MODEL_ARG,
    prompt: str = typer.Argument(None, help="what to ask; without it, a conversation read line by line from stdin"),
    system: str = typer.Option(None, "--system", help="a system prompt"),
    max_tokens: int = typer.Option(None, "--max-tokens", help="the most tokens an answer may have"),
    url: str = URL_OPTION,
) -> None:
    """Chat with MODEL (like `ollama run`), printing the answer as it is generated.

    Without PROMPT, each line read from stdin is a turn of one conversation (/clear forgets it, /bye or the end
    of the input ends it)."""
    client = _client(url)
    try:
        snap = client.start(model, wait=False)  # starts or wakes it, with a progress line on a terminal
    except DaemonError as exc:
        if exc.status not in (401, 403):
            raise
        name = model  # a key for the models but not for the admin API: the request itself starts the model
    else:
        if snap["state"] != "running":
            snap = _follow_start(client, model, snap, verbose=False)
        name = snap["model"]
    base = [{"role": "system", "content": system}] if system else []
    options = {"max_tokens": max_tokens} if max_tokens else {}
    if prompt is not None:
        if _answer(client, name, [*base, {"role": "user", "content": prompt}], options) is None:
            raise typer.Exit(1)
        return
    messages = list(base)
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            typer.echo(">>> ", nl=False)
        try:
            line = sys.stdin.readline()
        except KeyboardInterrupt:
            typer.echo()
            return
        if not line:
            return
        text = line.strip()
        if not text:
            continue
        if text in ("/bye", "/exit", "/quit"):
            return
        if text == "/clear":
            messages = list(base)
            typer.echo("Cleared the conversation.", err=True)
            continue
        messages.append({"role": "user", "content": text})
        reply = _answer(client, name, messages, options)
        if reply is None:
            messages.pop()
        else:
            messages.append({"role": "assistant", "content": reply})


def _answer(client: Client, model: str, messages: list[dict[str, Any]], options: dict[str, Any]) -> str | None:
    """Print the answer as it streams; the whole answer (None after an error, which is printed)."""
    parts = []
    try:
        for piece in client.chat_stream(model, messages, **options):
            parts.append(piece)
            typer.echo(piece, nl=False)
            sys.stdout.flush()
    except KeyboardInterrupt:
        typer.echo()
        return "".join(parts)
    except DaemonError as exc:
        if parts:
            typer.echo()
        typer.echo(f"Error: {exc.message}", err=True)
        return None
    typer.echo()
    return "".join(parts)


def main() -> None:
    try:
        app()
    except DaemonNotRunning as exc:
        typer.echo(f"Error: {exc}", err=True)
        sys.exit(1)
    except DaemonError as exc:
        typer.echo(f"Error: {exc.message}", err=True)
        sys.exit(1)
