"""Load benchmark of `polysense serve` on loopback: batching against one-at-a-time, overload, a soak, SIGTERM.

    python benchmarks/serving.py --bundle runs/demo/bundle          (or: make bench-serving; about 9 minutes)
    python benchmarks/serving.py --bundle runs/demo/bundle --quick  (a smoke run of seconds; the suite runs it)

Two servers run side by side on 127.0.0.1: the default one (dynamic batching) and the same with --max-batch 1
(every request its own model run: the unbatched reference). The load generator (benchmarks/loadgen.py) is a
process of its own on the same machine; its CPU counts against the server's, as the issue's targets ask.
Requests are text predictions (the built-in bundle), as in the issue's orientation figures.

1. Closed loop at 1, 4, 16, 32 and 64 clients against both servers, interleaved: throughput, p50/p90/p99,
   errors, mean batch size (from the server's /metrics).
2. Overload: open loop at 4x the best closed-loop throughput, on 512 connections opened before it starts
   (loadgen --preopen); only 503s may fail, and accepted requests' p99 is compared with the unloaded (1 client)
   p50.
3. Soak: 32 clients for 5 minutes, the server's RSS sampled every 5 s.
4. SIGTERM under load: 16 clients, the signal after 3 s; exit status and time, every answer a 200.
Results: benchmarks/results/serving.{json,md,png}, with the CPU's instruction sets.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
LOADGEN = Path(__file__).with_name("loadgen.py")
COMMAND = "python benchmarks/serving.py --bundle runs/demo/bundle"


class Server:
    """`polysense serve` in a process of its own."""

    def __init__(self, bundle: str, *flags: str) -> None:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.command = [
            sys.executable,
            "-m",
            "polysense.cli.main",
            "--quiet",
            "serve",
            bundle,
            "--port",
            str(self.port),
        ]
        self.command += ["--device", "cpu", *flags]
        # a file, not a pipe: a pipe nobody drains would stall the server once full
        self.log = tempfile.TemporaryFile("w+")  # noqa: SIM115 (lives as long as the server)
        self.process = subprocess.Popen(self.command, stdout=subprocess.DEVNULL, stderr=self.log, text=True)
        deadline = time.monotonic() + 120
        while self.get("/readyz") != 200:
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"the server did not start: {self.stderr()}")
            time.sleep(0.2)

    def stderr(self) -> str:
        self.log.seek(0)
        return self.log.read()

    def get(self, path: str) -> int | str | None:
        """The status of GET path (the body for /metrics); None while nothing answers."""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=5) as answer:
                return answer.read().decode() if path == "/metrics" else answer.status
        except OSError as error:
            return getattr(error, "code", None)

    def batches(self) -> tuple[float, float]:
        """(requests, model runs) the batcher made so far."""
        values = {}
        for line in str(self.get("/metrics")).splitlines():
            name, _, value = line.partition(" ")
            if name in ("polysense_batch_size_sum", "polysense_batch_size_count"):
                values[name] = float(value)
        return values.get("polysense_batch_size_sum", 0.0), values.get("polysense_batch_size_count", 0.0)

    def rss_mb(self) -> float:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            self.process.wait(30)


def load(port: int, seconds: float, *mode: str) -> dict:
    command = [sys.executable, str(LOADGEN), "--port", str(port), "--seconds", str(seconds), *mode]
    return json.loads(subprocess.run(command, capture_output=True, text=True, check=True).stdout)


def closed(server: Server, clients: int, seconds: float) -> dict:
    before = server.batches()
    result = load(server.port, seconds, "--closed", str(clients))
    after = server.batches()
    runs = after[1] - before[1]
    result.update(clients=clients, mean_batch=(after[0] - before[0]) / runs if runs else None)
    return result


def soak(server: Server, seconds: float) -> dict:
    samples: list[tuple[float, float]] = []
    result: dict = {}
    worker = threading.Thread(target=lambda: result.update(load(server.port, seconds, "--closed", "32")))
    start = time.monotonic()
    worker.start()
    while worker.is_alive():
        samples.append((time.monotonic() - start, server.rss_mb()))
        worker.join(5)
    samples.append((time.monotonic() - start, server.rss_mb()))
    result.update(rss_mb=samples, rss_growth_mb=samples[-1][1] - samples[0][1])
    result["rss_max_growth_mb"] = max(r for _, r in samples) - samples[0][1]
    return result


def sigterm(server: Server, after_s: float) -> dict:
    result: dict = {}
    worker = threading.Thread(target=lambda: result.update(load(server.port, after_s + 15, "--closed", "16")))
    worker.start()
    time.sleep(after_s)
    sent = time.monotonic()
    server.process.send_signal(signal.SIGTERM)
    code = server.process.wait(30)
    result.update(exit_code=code, exit_seconds=time.monotonic() - sent)
    worker.join()
    # The server's own count: a request the client saw cut off was never read by the server (it arrived on a
    # keep-alive connection as the server closed it) unless the server counts it as accepted and unanswered.
    said = [line for line in server.stderr().splitlines() if "prediction requests accepted" in line]
    numbers = [int(word) for word in said[-1].replace(",", "").split() if word.isdigit()] if said else []
    result.update(
        server_accepted=numbers[0] if numbers else None, server_answered=numbers[1] if numbers else None
    )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", default=str(ROOT / "runs" / "demo" / "bundle"))
    parser.add_argument("--quick", action="store_true", help="seconds, not minutes: a smoke run")
    parser.add_argument("--out", default=str(RESULTS), help="folder for serving.{json,md,png}")
    args = parser.parse_args()
    from polysense.tools.bench import machine

    levels, run_s, soak_s = ((1, 32), 1.0, 3.0) if args.quick else ((1, 4, 16, 32, 64), 10.0, 300.0)
    batched, unbatched = Server(args.bundle), Server(args.bundle, "--max-batch", "1")
    command = (
        COMMAND
        if Path(args.bundle).resolve() == ROOT / "runs" / "demo" / "bundle"
        else (f"python benchmarks/serving.py --bundle {args.bundle} --out {args.out}")
    )
    report: dict = {"command": command, "machine": machine(), "quick": args.quick, "bundle": args.bundle}
    report["servers"] = {"batched": batched.command[2:], "unbatched": unbatched.command[2:]}
    try:
        report["closed"] = {"batched": [], "unbatched": []}
        for clients in levels:
            for name, server in (("batched", batched), ("unbatched", unbatched)):
                report["closed"][name].append(closed(server, clients, run_s))
                print(f"{name:>9} {clients:>3} clients: {_line(report['closed'][name][-1])}", flush=True)
        unbatched.stop()
        capacity = max(r["throughput_rps"] for r in report["closed"]["batched"])
        report["overload"] = load(
            batched.port, 15.0 if not args.quick else 2.0, "--open-rate", str(4 * capacity), "--preopen"
        )
        report["overload"]["alive_after"] = batched.get("/readyz") == 200
        print(f"overload at {4 * capacity:.0f}/s: {_line(report['overload'])}", flush=True)
        report["soak"] = soak(batched, soak_s)
        print(
            f"soak {soak_s:.0f} s: {_line(report['soak'])}, RSS growth {report['soak']['rss_growth_mb']:+.1f} MB"
        )
        report["sigterm"] = sigterm(batched, 1.0 if args.quick else 3.0)
        print(f"SIGTERM: exit {report['sigterm']['exit_code']} in {report['sigterm']['exit_seconds']:.2f} s")
    finally:
        batched.stop()
        unbatched.stop()
    report["targets"] = targets(report)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "serving.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "serving.md").write_text(markdown(report))
    plot(report, out / "serving.png")
    print(markdown(report))


def _line(r: dict) -> str:
    p99 = f"{r['p99_ms']:.1f}" if r["p99_ms"] is not None else "-"
    batch = f", batch {r['mean_batch']:.1f}" if r.get("mean_batch") else ""
    return (
        f"{r['throughput_rps']:.0f} req/s, p50 {r['p50_ms'] or 0:.2f} ms, p99 {p99} ms, "
        f"rejected {r['rejected']}, errors {r['errors']}{batch}"
    )


def targets(report: dict) -> list[dict]:
    closed_b = {r["clients"]: r for r in report["closed"]["batched"]}
    closed_u = {r["clients"]: r for r in report["closed"]["unbatched"]}
    one, many = closed_b[1], closed_b[32]
    overload, soaked, stop = report["overload"], report["soak"], report["sigterm"]
    return [
        _target(
            "32 clients vs one at a time (same server)",
            many["throughput_rps"] / one["throughput_rps"],
            ">=",
            2.5,
        ),
        _target("1 client: batched p50 / unbatched p50", one["p50_ms"] / closed_u[1]["p50_ms"], "<=", 1.2),
        _target("soak: requests", soaked["answered_200"], ">=", 100_000),
        _target("soak: errors", soaked["errors"] + soaked["rejected"], "<=", 0),
        _target("overload: errors other than 503", overload["errors"], "<=", 0),
        _target("overload: accepted p99 / unloaded p50", (overload["p99_ms"] or 0) / one["p50_ms"], "<=", 10),
        _target("overload: server alive after", int(overload["alive_after"]), ">=", 1),
        _target("soak: server RSS growth (MB)", soaked["rss_growth_mb"], "<=", 20),
        _target("SIGTERM: exit status", stop["exit_code"], "<=", 0),
        _target("SIGTERM: seconds to exit", stop["exit_seconds"], "<=", 10),
        _target(
            "SIGTERM: answers other than 200",
            sum(v for k, v in stop["statuses"].items() if k != "200"),
            "<=",
            0,
        ),
        _target(
            "SIGTERM: accepted requests unanswered (server's count)",
            (stop["server_accepted"] or 0) - (stop["server_answered"] or 0) if stop["server_accepted"] else 1,
            "<=",
            0,
        ),
    ]


def _target(name: str, value: float, sense: str, bound: float) -> dict:
    met = value >= bound if sense == ">=" else value <= bound
    return {"target": f"{name} {sense} {bound:g}", "value": value, "met": bool(met)}


def targets_table(targets: list[dict]) -> list[str]:
    """A report's targets as markdown rows: each target, its measured value and whether it is met."""
    rows = [f"| {t['target']} | {t['value']:.3g} | {'yes' if t['met'] else '**no**'} |" for t in targets]
    return ["| target | value | met |", "|---|---|---|", *rows]


def markdown(report: dict) -> str:
    info = report["machine"]
    lines = [
        "# polysense serve under load",
        "",
        f"Command: `{report['command']}`{' (--quick: a smoke run, not a measurement)' if report['quick'] else ''}.",
        f"Machine: {info['cpus']} CPUs, {'/'.join(info['isa'])}; server and load generator share them.",
        f"Text predictions on `{os.path.relpath(Path(report['bundle']).resolve(), ROOT)}` over HTTP/1.1 "
        "keep-alive on loopback.",
        "",
        "| server | clients | req/s | p50 ms | p90 ms | p99 ms | mean batch | rejected | errors |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, rows in report["closed"].items():
        for r in rows:
            batch = f"{r['mean_batch']:.1f}" if r.get("mean_batch") else "-"
            lines.append(
                f"| {name} | {r['clients']} | {r['throughput_rps']:.0f} | {r['p50_ms']:.2f} | {r['p90_ms']:.2f} "
                f"| {r['p99_ms']:.2f} | {batch} | {r['rejected']} | {r['errors']} |"
            )
    o, s, t = report["overload"], report["soak"], report["sigterm"]
    lines += [
        "",
        f"Overload: {o['offered_rps']:.0f} requests/s offered for {o['seconds']:.0f} s: {o['answered_200']} answered "
        f"(p50 {o['p50_ms'] or 0:.2f} ms, p99 {o['p99_ms'] or 0:.2f} ms from the scheduled start), {o['rejected']} "
        f"refused with 503, {o['errors']} errors, {o['not_sent']} not sent (all {o['connections']} connections busy); "
        f"server alive after: {o['alive_after']}.",
        f"Soak: {s['answered_200']:,} requests in {s['seconds']:.0f} s, {s['errors']} errors, {s['rejected']} "
        f"rejected; server RSS {s['rss_mb'][0][1]:.0f} -> {s['rss_mb'][-1][1]:.0f} MB "
        f"(growth {s['rss_growth_mb']:+.1f} MB, at most {s['rss_max_growth_mb']:+.1f}).",
        f"SIGTERM under 16 clients: exit {t['exit_code']} after {t['exit_seconds']:.2f} s; {t['answered_200']} "
        f"answered 200, statuses {t['statuses']}; the server accepted {t['server_accepted']} prediction requests "
        f"and answered {t['server_answered']}; {t['broken']} requests were cut off on the client's side (sent on "
        f"a keep-alive connection as the server closed it, never read by it), {t['refused_connections']} clients "
        "found the server no longer accepting connections.",
        "",
    ]
    return "\n".join(lines + targets_table(report["targets"])) + "\n"


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, middle, right) = plt.subplots(1, 3, figsize=(15, 4))
    for name, rows in report["closed"].items():
        clients = [r["clients"] for r in rows]
        left.plot(clients, [r["throughput_rps"] for r in rows], marker="o", label=name)
        middle.plot(clients, [r["p99_ms"] for r in rows], marker="o", label=name)
    left.set(xscale="log", xlabel="clients", ylabel="requests/s", title="throughput")
    middle.set(xscale="log", yscale="log", xlabel="clients", ylabel="ms", title="p99 latency")
    seconds, rss = zip(*report["soak"]["rss_mb"])
    right.plot(seconds, rss)
    right.set(xlabel="s", ylabel="MB", title="server RSS during the soak")
    for axis in (left, middle):
        axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=90)


if __name__ == "__main__":
    main()
