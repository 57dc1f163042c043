"""Loopback TCP against a Unix domain socket for vllama's hop to a child (issue 16: should children serve on
`--uds`?). Standard library only, so it runs on any host: an asyncio HTTP/1.1 server answers either a small JSON
body or a stream of small SSE chunks, and keep-alive clients measure requests/s and chunks/s over each transport.

    python bench/transport.py [--seconds 5] [--concurrency 1 16 64]

This isolates the transport; the relay's own work (bench/proxy.py) is the same over either.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable

_SMALL = b'{"object":"chat.completion","choices":[{"message":{"content":"ok"}}]}'
_CHUNK = b'data: {"choices":[{"delta":{"content":"tok"}}]}\n\n'
_STREAM_CHUNKS = 50


async def _serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":", 1)[1])
            body = await reader.readexactly(length)
            if body == b"stream":
                writer.write(
                    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
                )
                for _ in range(_STREAM_CHUNKS):
                    writer.write(b"%x\r\n%s\r\n" % (len(_CHUNK), _CHUNK))
                    await writer.drain()  # one write per event, as vLLM sends them
                writer.write(b"0\r\n\r\n")
            else:
                writer.write(
                    b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n" % len(_SMALL)
                )
                writer.write(_SMALL)
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()


async def _request(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, body: bytes) -> int:
    """One request on a kept-alive connection; the number of body bytes read."""
    writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))
    head = await reader.readuntil(b"\r\n\r\n")
    if b"content-length" in head:
        length = int(head.split(b"content-length: ")[1].split(b"\r\n")[0])
        return len(await reader.readexactly(length))
    total = 0
    while True:  # chunked
        size = int((await reader.readuntil(b"\r\n"))[:-2], 16)
        data = await reader.readexactly(size + 2)
        if size == 0:
            return total
        total += len(data) - 2


Opener = Callable[[], Awaitable[tuple[asyncio.StreamReader, asyncio.StreamWriter]]]


async def _load(open_conn: Opener, body: bytes, concurrency: int, seconds: float) -> tuple[float, float]:
    """Requests per second and the median latency (ms) over `seconds`, `concurrency` kept-alive clients."""
    latencies: list[float] = []
    deadline = time.perf_counter() + seconds

    async def client() -> None:
        reader, writer = await open_conn()
        while time.perf_counter() < deadline:
            t0 = time.perf_counter()
            await _request(reader, writer, body)
            latencies.append(time.perf_counter() - t0)
        writer.close()

    t0 = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    elapsed = time.perf_counter() - t0
    return len(latencies) / elapsed, statistics.median(latencies) * 1000


async def main(seconds: float, concurrencies: list[int]) -> None:
    folder = tempfile.mkdtemp(prefix="vllama-uds-")
    os.chmod(folder, 0o700)  # what vllama would do: only its user may connect
    path = os.path.join(folder, "child.sock")
    tcp = await asyncio.start_server(_serve, "127.0.0.1", 0)
    uds = await asyncio.start_unix_server(_serve, path)
    port = tcp.sockets[0].getsockname()[1]
    transports: dict[str, Opener] = {
        "tcp": lambda: asyncio.open_connection("127.0.0.1", port),
        "uds": lambda: asyncio.open_unix_connection(path),
    }
    print(f"{os.cpu_count()} CPUs; {seconds} s per cell; stream = {_STREAM_CHUNKS} SSE chunks of {len(_CHUNK)} B")
    print("| answer | concurrency | TCP req/s | UDS req/s | UDS/TCP | TCP p50 ms | UDS p50 ms |")
    print("|---|---|---|---|---|---|---|")
    for label, body in (("small JSON", b"{}"), ("SSE stream", b"stream")):
        for conc in concurrencies:
            rows = {name: await _load(opener, body, conc, seconds) for name, opener in transports.items()}
            (t_rate, t_p50), (u_rate, u_p50) = rows["tcp"], rows["uds"]
            ratio = u_rate / t_rate
            print(f"| {label} | {conc} | {t_rate:.0f} | {u_rate:.0f} | {ratio:.2f} | {t_p50:.3f} | {u_p50:.3f} |")
    tcp.close()
    uds.close()
    os.unlink(path)
    os.rmdir(folder)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64])
    args = parser.parse_args()
    asyncio.run(main(args.seconds, args.concurrency))
