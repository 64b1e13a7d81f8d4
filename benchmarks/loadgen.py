"""The load generator of benchmarks/serving.py: HTTP/1.1 keep-alive requests over raw asyncio sockets, in a
process of its own, printing one JSON result. Lean on purpose: on a 2-core machine the generator shares the
CPU with the server, and an HTTP client library would cost more per request than the server does.

    python benchmarks/loadgen.py --port 8000 --closed 32 --seconds 10            # 32 clients, one request each at a time
    python benchmarks/loadgen.py --port 8000 --open-rate 4000 --seconds 10      # 4000 requests/s whatever the answers

Closed loop: each client sends its next request when the last is answered (throughput and latency at a given
concurrency). Open loop: requests start on a fixed schedule, on any idle connection (a new one when none is
idle, up to --connections); latency is counted from the scheduled start, so a lagging generator or server
cannot hide queueing (no coordinated omission). With --preopen the open loop opens its --connections first,
each answered once (GET /healthz), as wrk and k6 open theirs before they measure: a server under overload
accepts new connections slowly (uvloop, measured: ~140 a second while refusing 7,500 requests a second), and
a request sent on a connection still waiting to be accepted waits seconds, whatever the server's queue holds.

--expect '{"label": ..., "probabilities": {...}}' checks every 200 answer against it (same label, every
probability within 1e-5) and counts the others as "wrong" (benchmarks/hostile.py passes Pipeline.predict's).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time

try:
    import uvloop
except ImportError:  # plain asyncio works too, a little slower
    uvloop = None

BODY = json.dumps({"text": "a red circle moving quickly upward"}).encode()


def request_bytes(body: bytes, token: str | None = None) -> bytes:
    auth = f"Authorization: Bearer {token}\r\n".encode() if token else b""
    return (
        b"POST /v1/predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        + auth
        + b"Content-Length: %d\r\n\r\n" % len(body)
        + body
    )


class Connection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.closing = False
        self.body = b""  # the last answer's body

    @classmethod
    async def open(cls, port: int) -> Connection:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        return cls(reader, writer)

    async def send(self, request: bytes) -> int:
        """One request and its whole answer; the HTTP status. After an answer with `Connection: close` (a
        server shutting down) the connection is closed, as a well-behaved client does."""
        self.writer.write(request)
        head = await self.reader.readuntil(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.lower() == b"content-length":
                length = int(value)
            elif name.lower() == b"connection" and value.strip().lower() == b"close":
                self.closing = True
        self.body = await self.reader.readexactly(length)
        return int(head[9:12])

    def close(self) -> None:
        self.writer.close()

    @property
    def closed_by_server(self) -> bool:
        """An idle connection the server has closed (its idle timeout): not to be sent on again."""
        return self.reader.at_eof()


def same_answer(body: bytes, expected: dict, tolerance: float = 1e-5) -> bool:
    """Whether a /v1/predict answer has the expected label and every expected probability within tolerance."""
    try:
        answer = json.loads(body)
        got = answer["probabilities"]
        return answer["label"] == expected["label"] and all(
            abs(got[name] - p) <= tolerance for name, p in expected["probabilities"].items()
        )
    except (ValueError, KeyError, TypeError):
        return False


class Tally:
    def __init__(self, expected: dict | None = None) -> None:
        self.expected = expected  # answers checked against it when given
        self.wrong = 0  # answered 200 with another label or probabilities than expected
        self.latencies: list[float] = []  # seconds, answered 200
        self.statuses: dict[int, int] = {}
        self.refused = 0  # connections the server did not accept (it had stopped listening)
        self.broken = 0  # requests sent whose connection broke before the answer

    def add(self, status: int, seconds: float, body: bytes = b"") -> None:
        self.statuses[status] = self.statuses.get(status, 0) + 1
        if status == 200:
            self.latencies.append(seconds)
            if self.expected is not None and not same_answer(body, self.expected):
                self.wrong += 1

    def summary(self, elapsed: float) -> dict:
        ok = sorted(self.latencies)

        def quantile(q: float) -> float | None:
            return ok[min(len(ok) - 1, int(q * len(ok)))] * 1000 if ok else None

        return {
            "seconds": elapsed,
            "answered_200": len(ok),
            "throughput_rps": len(ok) / elapsed,
            "p50_ms": quantile(0.5),
            "p90_ms": quantile(0.9),
            "p99_ms": quantile(0.99),
            "mean_ms": sum(ok) / len(ok) * 1000 if ok else None,
            "statuses": {str(k): v for k, v in sorted(self.statuses.items())},
            "rejected": sum(v for k, v in self.statuses.items() if k in (429, 503)),
            "errors": self.broken + sum(v for k, v in self.statuses.items() if k not in (200, 429, 503)),
            "refused_connections": self.refused,
            "broken": self.broken,
            "checked": self.expected is not None,
            "wrong": self.wrong,
        }


async def closed_loop(
    port: int, clients: int, seconds: float, request: bytes, expected: dict | None = None
) -> dict:
    tally = Tally(expected)
    stop = time.perf_counter() + seconds

    async def client() -> None:
        connection = None
        while time.perf_counter() < stop:
            if connection is None:
                try:
                    connection = await Connection.open(port)
                except OSError:
                    tally.refused += 1
                    return
            begin = time.perf_counter()
            try:
                status = await connection.send(request)
            except (OSError, asyncio.IncompleteReadError):
                tally.broken += 1
                connection.close()
                return
            tally.add(status, time.perf_counter() - begin, connection.body)
            if connection.closing:
                connection.close()
                connection = None
        if connection is not None:
            connection.close()

    start = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    return tally.summary(time.perf_counter() - start)


async def preopened(port: int, count: int) -> list[Connection]:
    """`count` connections the server has accepted: each has had one answer (GET /healthz)."""

    async def one() -> Connection:
        connection = await Connection.open(port)
        await connection.send(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        return connection

    return list(await asyncio.gather(*(one() for _ in range(count))))


async def open_loop(
    port: int,
    rate: float,
    seconds: float,
    max_connections: int,
    request: bytes,
    expected: dict | None = None,
    preopen: bool = False,
) -> dict:
    tally = Tally(expected)
    from_send: list[
        float
    ] = []  # latency of the answered from their actual send (the generator's lag left out)
    idle: list[Connection] = await preopened(port, max_connections) if preopen else []
    opened = len(idle)
    not_sent = 0
    pending: set[asyncio.Task] = set()

    async def one(scheduled: float, connection: Connection | None) -> None:
        nonlocal opened
        if connection is None:
            try:
                connection = await Connection.open(port)
            except OSError:
                tally.refused += 1
                opened -= 1
                return
        sent = time.perf_counter()
        try:
            status = await connection.send(request)
        except (OSError, asyncio.IncompleteReadError):
            tally.broken += 1
            connection.close()
            opened -= 1
            return
        tally.add(status, time.perf_counter() - scheduled, connection.body)
        if status == 200:
            from_send.append(time.perf_counter() - sent)
        if connection.closing:
            connection.close()
            opened -= 1
        else:
            idle.append(connection)

    start = time.perf_counter()
    total = int(rate * seconds)
    for index in range(total):
        scheduled = start + index / rate
        # Always yield, even when behind schedule: otherwise no answer is read while requests are issued.
        await asyncio.sleep(max(0.0, scheduled - time.perf_counter()))
        while idle and idle[-1].closed_by_server:
            idle.pop().close()
            opened -= 1
        if idle:
            connection = idle.pop()
        elif opened < max_connections:
            connection, opened = None, opened + 1  # counted now: the task opens it later
        else:
            not_sent += 1  # every connection is busy: the generator, not the server, is the limit here
            continue
        task = asyncio.ensure_future(one(scheduled, connection))
        pending.add(task)
        task.add_done_callback(pending.discard)
    if pending:
        await asyncio.wait(pending, timeout=30)
    elapsed = time.perf_counter() - start
    for connection in idle:
        connection.close()
    summary = tally.summary(elapsed)
    from_send.sort()
    p99_from_send = (
        from_send[min(len(from_send) - 1, int(0.99 * len(from_send)))] * 1000 if from_send else None
    )
    summary.update(offered_rps=rate, not_sent=not_sent, connections=opened, p99_from_send_ms=p99_from_send)
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--seconds", type=float, default=10.0)
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--closed", type=int, metavar="CLIENTS")
    mode.add_argument("--open-rate", type=float, metavar="RPS")
    parser.add_argument("--connections", type=int, default=512, help="open loop: connections at most")
    parser.add_argument(
        "--preopen", action="store_true", help="open loop: open --connections before the start"
    )
    parser.add_argument("--token", help="bearer token, if the server wants one")
    parser.add_argument("--expect", type=json.loads, help="JSON {label, probabilities} every 200 must match")
    args = parser.parse_args()
    request = request_bytes(BODY, args.token)
    if args.closed:
        work = closed_loop(args.port, args.closed, args.seconds, request, args.expect)
    else:
        work = open_loop(
            args.port, args.open_rate, args.seconds, args.connections, request, args.expect, args.preopen
        )
    result = uvloop.run(work) if uvloop else asyncio.run(work)
    json.dump(result, sys.stdout)


if __name__ == "__main__":
    main()
