"""Good clients against `polysense serve` while one hostile client attacks it (issue 40), and the socket helpers
tests/test_hostile_clients.py shares.

    python benchmarks/hostile.py --bundle runs/demo/bundle          (or: make bench-serving-hostile; ~3.5 min)
    python benchmarks/hostile.py --bundle runs/demo/bundle --quick  (a smoke run of seconds; the suite runs it)

One server with its default limits (fp32, so that answers can be compared exactly) on a free port of 127.0.0.1.
16 good clients (benchmarks/loadgen.py, closed loop, a process of its own) post one text for a fixed window and
check every answer against Pipeline.predict on the same text (same label, probabilities within 1e-5): first
with no attack (the baseline), then while each attack runs alone, then with no attack again (the drift of a
shared machine); a warm-up window before them is not reported. Each attack opens all its sockets, then a second
later the window starts, and its sockets are replaced as the server closes them, so it lasts the whole window:

- endless header: 4 connections each streaming a header value, 1 KB every 10 ms;
- slow headers: 64 connections each sending one byte of a request head every 0.1 s;
- lying Content-Length: 128 JSON requests (the default --max-queue) declaring 100 bytes and sending none;
- slow body: 16 multipart requests declaring 32 MB, one byte every 0.5 s;
- idle connections: 1,000 connections that send nothing;
- idle WebSocket starts: 256 upgraded /v1/stream connections (the default --max-streams) that never send their
  start message;
- hang-ups: 40 requests a second that send their head and 10 of their 1,000 body bytes, then close.

Per condition: the good clients' throughput and p50/p99 latency (and their ratios to the baseline), answers
other than 200, wrong answers, the server's RSS (VmRSS sampled every 0.5 s, and VmHWM) and what the attacker
saw (the statuses it got, connections opened). Results: benchmarks/results/serving_hostile.{json,md}.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import resource
import select
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
LOADGEN = Path(__file__).with_name("loadgen.py")
COMMAND = "python benchmarks/hostile.py --bundle runs/demo/bundle"
GOOD_CLIENTS = 16
TARGET_THROUGHPUT = 0.8  # of the baseline, while any one attack runs
TARGET_P99 = 3.0  # times the baseline p99
TARGET_RSS_MB = 256.0  # peak RSS over the baseline's peak (the per-input bound of docs/security.md)


# --- sockets (shared with tests/test_hostile_clients.py) ---


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def connect(port: int, timeout: float = 5.0) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=timeout)


def read_all(sock: socket.socket, within_s: float) -> bytes:
    """What the server sends until it closes the connection (bounded in time)."""
    sock.settimeout(within_s)
    data = b""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        try:
            chunk = sock.recv(65536)
        except (TimeoutError, ConnectionResetError):
            break
        if not chunk:
            break
        data += chunk
    return data


def closed_within(sock: socket.socket, seconds: float) -> bool:
    """Whether the server closed the connection (after an answer or not) within `seconds`."""
    sock.settimeout(seconds)
    try:
        sock.recv(65536)
        return True
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def websocket_upgrade(path: str = "/v1/stream") -> bytes:
    key = base64.b64encode(os.urandom(16))
    return (
        f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n".encode()
        + b"Sec-WebSocket-Key: "
        + key
        + b"\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )


# --- attacks ---

JSON_HEAD = (
    b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
)
MULTIPART_HEAD = (
    b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Length: 33554432\r\n"
    b"Content-Type: multipart/form-data; boundary=b\r\n\r\n--b\r\n"
)


@dataclass(frozen=True)
class Attack:
    """`connections` sockets, each opened with `opening` and then sent `drip(tick)` every `tick_s` seconds; a
    socket the server answers or closes is read, counted by its status and replaced. `hang_up`: every socket is
    closed by the attacker after its opening and replaced at the next tick (a client gone mid-body)."""

    name: str
    connections: int
    opening: Callable[[], bytes]
    drip: Callable[[int], bytes] | None = None
    tick_s: float = 0.1
    hang_up: bool = False
    upgrade: bool = False  # read the 101 of a WebSocket upgrade after the opening


def attacks(quick: bool) -> list[Attack]:
    scale = 8 if quick else 1  # --quick: fewer sockets, the same mechanisms
    return [
        Attack(
            "endless header",
            4,
            lambda: b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nX-Endless: ",
            lambda tick: b"a" * 1024,
            0.01,
        ),
        Attack(
            "slow headers",
            64 // scale,
            lambda: b"GET /v1/info HTTP/1.1\r\nHost: x\r\nX-Slow: ",
            lambda tick: b"s",
            0.1,
        ),
        Attack("lying Content-Length", 128 // scale, lambda: JSON_HEAD % 100),
        Attack("slow body", 16 // scale, lambda: MULTIPART_HEAD, lambda tick: b"x", 0.5),
        Attack("idle connections", 1000 // scale, lambda: b""),
        Attack("idle WebSocket starts", 256 // scale, websocket_upgrade, upgrade=True),
        Attack("hang-ups mid-body", 2, lambda: JSON_HEAD % 1000 + b'{"text": "', tick_s=0.05, hang_up=True),
    ]


class Attacker:
    """Runs one Attack in a thread until stop() (or `limit_s`, whichever comes first)."""

    def __init__(self, attack: Attack, port: int, limit_s: float) -> None:
        self.attack, self.port, self.limit_s = attack, port, limit_s
        self.counts: Counter[str] = Counter()
        self.open_max = 0
        self.stopping = threading.Event()
        self.established = threading.Event()  # every socket opened once
        self.thread = threading.Thread(target=self.run, daemon=True)

    def __enter__(self) -> Attacker:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopping.set()
        self.thread.join(30)

    def open(self) -> socket.socket | None:
        try:
            sock = connect(self.port)
            sock.sendall(self.attack.opening())
            if self.attack.upgrade:
                head = read_all_until(sock, b"\r\n\r\n", 5)
                self.counts["upgraded" if head.startswith(b"HTTP/1.1 101") else _status(head)] += 1
            sock.setblocking(False)
        except OSError as error:
            self.counts[f"connect failed: {type(error).__name__}"] += 1
            return None
        self.counts["opened"] += 1
        return sock

    def run(self) -> None:
        attack = self.attack
        deadline = time.monotonic() + self.limit_s
        socks: list[socket.socket] = []
        tick = 0
        try:
            while not self.stopping.is_set() and time.monotonic() < deadline:
                while len(socks) < attack.connections and not self.stopping.is_set():
                    sock = self.open()
                    if sock is None:
                        break
                    socks.append(sock)
                self.open_max = max(self.open_max, len(socks))
                if len(socks) == attack.connections or attack.hang_up:
                    self.established.set()
                if attack.hang_up:
                    for sock in socks:
                        sock.close()
                        self.counts["hung up"] += 1
                    socks = []
                else:
                    socks = self.step(socks, attack.drip(tick) if attack.drip else b"")
                tick += 1
                self.stopping.wait(attack.tick_s)
        finally:
            for sock in socks:
                sock.close()

    def step(self, socks: list[socket.socket], data: bytes) -> list[socket.socket]:
        """Reads what the server sent (an answer or a close: the socket is counted and dropped), then sends data
        on the rest."""
        poller = select.poll()  # not select.select: 1,000 sockets pass FD_SETSIZE
        for sock in socks:
            poller.register(sock, select.POLLIN)
        ready = {fd for fd, _ in poller.poll(0)}
        kept = []
        for sock in socks:
            if sock.fileno() in ready:
                try:  # what has arrived, without waiting: a WebSocket close handshake would hold this thread
                    answer = sock.recv(65536)
                except (BlockingIOError, ConnectionResetError):
                    answer = b""
                self.counts[_status(answer)] += 1
                sock.close()
                continue
            if data:
                try:
                    sock.send(data)
                except BlockingIOError:
                    pass  # the server stopped reading: the bytes wait
                except OSError:
                    self.counts["reset"] += 1
                    sock.close()
                    continue
            kept.append(sock)
        return kept


def read_all_until(sock: socket.socket, end: bytes, within_s: float) -> bytes:
    sock.settimeout(within_s)
    data = b""
    deadline = time.monotonic() + within_s
    while end not in data and time.monotonic() < deadline:
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    return data


def _status(answer: bytes) -> str:
    """ "408", "431", ... for an HTTP answer; what else the server sent otherwise."""
    if answer.startswith(b"HTTP/1.1 "):
        return answer[9:12].decode()
    if not answer:
        return "closed"
    if answer[:1] == b"\x81" or answer[:1] == b"\x88":  # a WebSocket text or close frame
        return "websocket message/close"
    return "other"


# --- the benchmark ---


def memory(pid: int) -> dict[str, float]:
    """VmRSS and VmHWM of a process, in MB."""
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            values[name] = int(value.split()[0]) / 1024
    return values


def raise_fd_limit(wanted: int) -> dict:
    """The soft limit on open files raised to `wanted` (within the hard limit) when lower; the server inherits
    it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    raised = soft < wanted
    if raised:
        new = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
    return {"soft_before": soft, "soft": resource.getrlimit(resource.RLIMIT_NOFILE)[0], "raised": raised}


def good_clients(port: int, seconds: float, expected: dict, pid: int) -> dict:
    """The load generator for `seconds`, the server's RSS sampled while it runs; a generator still running
    30 s after its window (the server stalled its clients) is stopped and counted as nothing answered."""
    command = [sys.executable, str(LOADGEN), "--port", str(port), "--seconds", str(seconds)]
    command += ["--closed", str(GOOD_CLIENTS), "--expect", json.dumps(expected)]
    peak = memory(pid)["VmRSS"]
    with subprocess.Popen(command, stdout=subprocess.PIPE, text=True) as process:
        deadline = time.monotonic() + seconds + 30
        while process.poll() is None and time.monotonic() < deadline:
            peak = max(peak, memory(pid)["VmRSS"])
            time.sleep(0.5)
        if process.poll() is None:
            process.kill()
            process.wait()
            result = {
                "stalled": True,
                "throughput_rps": 0.0,
                "answered_200": 0,
                "p50_ms": None,
                "p99_ms": None,
            }
            result.update(errors=None, wrong=0, statuses={})
        else:
            result = json.loads(process.stdout.read() if process.stdout else "{}")
            result["stalled"] = False
    result.update(rss_peak_mb=peak, **{f"{k}_mb": v for k, v in memory(pid).items()})
    return result


def ready(port: int, within_s: float) -> bool:
    import urllib.request

    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as answer:
                if answer.status == 200:
                    return True
        except OSError:
            pass
        time.sleep(0.2)
    return False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", default=str(ROOT / "runs" / "demo" / "bundle"))
    parser.add_argument("--quick", action="store_true", help="seconds, not minutes: a smoke run")
    parser.add_argument("--window-s", type=float, help="seconds per condition (default 15, --quick 1.5)")
    parser.add_argument("--out", default=str(RESULTS), help="folder for serving_hostile.{json,md}")
    parser.add_argument("--note", default="", help="a sentence for the report (what else ran on the machine)")
    args = parser.parse_args()
    import polysense
    from benchmarks.serving import Server
    from polysense.machine import machine

    window = args.window_s or (1.5 if args.quick else 15.0)
    plan = attacks(args.quick)
    fd_limit = raise_fd_limit(4096)  # the idle-connection attack's 1,000 sockets, and as many in the server
    text = json.loads(_loadgen().BODY)["text"]
    prediction = polysense.Pipeline.load(args.bundle, device="cpu", precision="fp32").predict(text=text)
    expected = {"label": prediction.label, "probabilities": dict(prediction.probabilities)}
    # --quick: the server's limits at 1 s, so that the attackers' sockets are closed and replaced within a window
    limits = (
        ["--header-timeout-s", "1", "--body-timeout-s", "1", "--ws-start-timeout-s", "1"]
        if args.quick
        else []
    )
    server = Server(args.bundle, "--precision", "fp32", *limits)
    report: dict = {
        "command": COMMAND,
        "machine": machine(),
        "quick": args.quick,
        "bundle": args.bundle,
        "server": server.command[2:],
        "window_s": window,
        "good_clients": GOOD_CLIENTS,
        "text": text,
        "fd_limit": fd_limit,
        "note": args.note,
        "conditions": [],
    }
    try:
        # a warm-up, not reported: the first window measured after a cold server ran 25 % slower than the last
        good_clients(server.port, min(5.0, window), expected, server.process.pid)
        for attack in [None, *plan, None]:
            name = attack.name if attack else "no attack"
            if attack is None:
                row = good_clients(server.port, window, expected, server.process.pid)
                row["attacker"] = {}
            else:
                with Attacker(attack, server.port, window + 60) as attacker:
                    began = time.monotonic()
                    attacker.established.wait(20)  # every socket open before measuring (bounded)
                    time.sleep(1.0)
                    ramp = time.monotonic() - began
                    row = good_clients(server.port, window, expected, server.process.pid)
                row["attacker"] = dict(attacker.counts, open_max=attacker.open_max)
                row["attack_ramp_s"] = ramp
                row["attack"] = {"connections": attack.connections, "tick_s": attack.tick_s}
            row["condition"] = name
            row["server_alive"] = server.process.poll() is None and ready(server.port, 30)
            report["conditions"].append(row)
            print(f"{name:>22}: {_line(row)}", flush=True)
            time.sleep(0.5)
    finally:
        server.stop()
    report["server_log_tracebacks"] = server.stderr().count("Traceback")
    _ratios(report)
    report["targets"] = targets(report)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "serving_hostile.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "serving_hostile.md").write_text(markdown(report))
    print(markdown(report))


def _loadgen():  # noqa: ANN202 (the module)
    from benchmarks import loadgen

    return loadgen


def _ratios(report: dict) -> None:
    base = report["conditions"][0]
    for row in report["conditions"]:
        row["throughput_ratio"] = (
            row["throughput_rps"] / base["throughput_rps"] if base["throughput_rps"] else None
        )
        row["p99_ratio"] = row["p99_ms"] / base["p99_ms"] if row["p99_ms"] and base["p99_ms"] else None
        row["rss_over_baseline_mb"] = row["rss_peak_mb"] - base["rss_peak_mb"]


def targets(report: dict) -> list[dict]:
    rows = []
    for row in report["conditions"][1:-1]:
        name = row["condition"]
        rows += [
            _target(
                f"{name}: throughput / baseline", row["throughput_ratio"] or 0.0, ">=", TARGET_THROUGHPUT
            ),
            _target(f"{name}: p99 / baseline p99", row["p99_ratio"] or float("inf"), "<=", TARGET_P99),
            _target(f"{name}: wrong answers", row["wrong"], "<=", 0),
            _target(f"{name}: peak RSS over baseline (MB)", row["rss_over_baseline_mb"], "<=", TARGET_RSS_MB),
        ]
    rows.append(_target("server log: tracebacks", report["server_log_tracebacks"], "<=", 0))
    return rows


def _target(name: str, value: float, sense: str, bound: float) -> dict:
    met = value >= bound if sense == ">=" else value <= bound
    return {"target": f"{name} {sense} {bound:g}", "value": value, "met": bool(met)}


def _ms(value: float | None) -> str:
    return f"{value:.2f}" if value is not None else "-"


def _ratio(value: float | None) -> str:
    return f"{value:.2f}" if value is not None else "-"


def _line(row: dict) -> str:
    return (
        f"{row['throughput_rps']:.0f} req/s, p50 {_ms(row['p50_ms'])} ms, p99 {_ms(row['p99_ms'])} ms, "
        f"not 200 {_not_200(row)}, wrong {row['wrong']}, RSS peak {row['rss_peak_mb']:.0f} MB"
        + (" (load generator stalled)" if row["stalled"] else "")
    )


def _not_200(row: dict) -> int | str:
    if row["stalled"]:
        return "stalled"
    return sum(v for k, v in row["statuses"].items() if k != "200") + row.get("broken", 0)


def markdown(report: dict) -> str:
    from benchmarks.serving import targets_table
    from polysense.machine import describe

    limit = report["fd_limit"]
    fd = (
        f"the open-file limit was raised from {limit['soft_before']} to {limit['soft']} for the attacker and the server"
        if limit["raised"]
        else f"the open-file limit ({limit['soft']}) needed no raising"
    )
    lines = [
        "# polysense serve under hostile clients",
        "",
        f"Command: `{report['command']}`{' (--quick: a smoke run, not a measurement)' if report['quick'] else ''}.",
        f"Machine: {describe(report['machine'])}; server, good clients and attacker share its CPUs; {fd}.",
        f"{report['good_clients']} good clients (closed loop, HTTP/1.1 keep-alive on loopback) post "
        f"`{report['text']}` for {report['window_s']:g} s per condition, every answer checked against "
        "Pipeline.predict (fp32), after an unreported warm-up; each attack runs alone, all its sockets open from a second "
        "before the window to its end. "
        f"Server: `polysense {' '.join(report['server'][1:])}` (default limits otherwise). {report['note']}",
        "",
        "| condition | req/s | / baseline | p50 ms | p99 ms | p99 / baseline | not 200 | wrong | RSS peak MB "
        "| VmHWM MB | attacker saw |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in report["conditions"]:
        saw = ", ".join(f"{k} {v}" for k, v in row["attacker"].items()) or "-"
        if "attack_ramp_s" in row:
            saw += f"; window began {row['attack_ramp_s']:.1f} s after the attack"
        lines.append(
            f"| {row['condition']} | {row['throughput_rps']:.0f} | {_ratio(row['throughput_ratio'])} "
            f"| {_ms(row['p50_ms'])} | {_ms(row['p99_ms'])} | {_ratio(row['p99_ratio'])} | {_not_200(row)} "
            f"| {row['wrong']} | {row['rss_peak_mb']:.0f} | {row['VmHWM_mb']:.0f} | {saw} |"
        )
    lines += [
        "",
        "The last row is the baseline again, after every attack: the drift of the machine over the run.",
        f"Server log: {report['server_log_tracebacks']} tracebacks.",
        "",
    ]
    return "\n".join(lines + targets_table(report["targets"])) + "\n"


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))  # `benchmarks.serving` when run as a script
    main()
