"""The overload phase of benchmarks/serving.py alone, with and without admission by expected wait, with the
load generator and the server sharing every core or pinned one core each.

    python benchmarks/serving_overload.py --bundle runs/demo/bundle             (about 5 minutes on 2 cores)
    python benchmarks/serving_overload.py --bundle runs/demo/bundle --quick     (a smoke run of seconds)

For each setting (shared: both processes on all cores, as benchmarks/serving.py runs them; pinned: the server
on core 1, the load generator on core 0, as `taskset -c 1` / `taskset -c 0` would) and each
--max-queue-delay-ms (0: off, admission by queue length alone, as before), one fresh server gets closed loops
at 1, 8 and 32 clients (the unloaded p50 is the 1-client one; 8 clients must see no refusals) and then an open
loop at 4x the best closed-loop throughput, as benchmarks/serving.py's overload phase does, on connections
opened before it starts (loadgen --preopen: a server refusing 7,000 requests a second accepts new connections
slowly, and a request sent on a connection not yet accepted waited up to 4 s). The CPU the load generator and
the server used during the overload is recorded, so that a generator short of CPU shows. Its functions
(Server, load, closed) are reused, not copied. Results: benchmarks/results/serving_overload.{json,md}.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import sys
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from serving import RESULTS, Server, _line, closed, load  # noqa: E402

COMMAND = "python benchmarks/serving_overload.py --bundle runs/demo/bundle"
SERVER_CORE, LOADGEN_CORE = 1, 0


@contextlib.contextmanager
def cores(which: set[int] | None) -> Iterator[None]:
    """Run what starts inside on `which` cores (children inherit it); None: every core."""
    every = os.sched_getaffinity(0)
    os.sched_setaffinity(0, which or every)
    try:
        yield
    finally:
        os.sched_setaffinity(0, every)


def run(bundle: str, setting: str, delay_ms: float, closed_s: float, overload_s: float) -> dict:
    pinned = setting == "pinned"
    with cores({SERVER_CORE} if pinned else None):
        server = Server(bundle, "--max-queue-delay-ms", f"{delay_ms:g}")
    result: dict = {"setting": setting, "max_queue_delay_ms": delay_ms, "server": server.command[2:]}
    try:
        with cores({LOADGEN_CORE} if pinned else None):
            result["closed"] = [closed(server, clients, closed_s) for clients in (1, 8, 32)]
            for row in result["closed"]:
                print(f"{setting} {delay_ms:g} ms, {row['clients']:>2} clients: {_line(row)}", flush=True)
            capacity = max(r["throughput_rps"] for r in result["closed"])
            result["overload"] = overload(server, overload_s, 4 * capacity)
        result["overload"]["alive_after"] = server.get("/readyz") == 200
    finally:
        server.stop()
    one = result["closed"][0]
    result["unloaded_p50_ms"] = one["p50_ms"]
    result["ratio"] = (result["overload"]["p99_ms"] or 0) / one["p50_ms"]
    result["refused_at_8_clients"] = result["closed"][1]["rejected"]
    print(
        f"{setting} {delay_ms:g} ms, overload at {4 * capacity:.0f}/s: {_line(result['overload'])}; "
        f"accepted p99 / unloaded p50 = {result['ratio']:.1f}",
        flush=True,
    )
    return result


def overload(server: Server, seconds: float, rate: float) -> dict:
    """The open loop at `rate` on pre-opened connections, with the CPU cores the load generator and the
    server used meanwhile (user + system time over the overload's wall time)."""
    generator, served = resource.getrusage(resource.RUSAGE_CHILDREN), _cpu_s(server.process.pid)
    result = load(server.port, seconds, "--open-rate", str(rate), "--preopen")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    used = after.ru_utime + after.ru_stime - generator.ru_utime - generator.ru_stime
    result["loadgen_cpu_cores"] = used / result["seconds"]
    result["server_cpu_cores"] = (_cpu_s(server.process.pid) - served) / result["seconds"]
    return result


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of process `pid` so far (its threads included)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", default=str(Path(RESULTS).parents[1] / "runs" / "demo" / "bundle"))
    parser.add_argument(
        "--delays", default="0,5", help="--max-queue-delay-ms values, comma-separated (0: off)"
    )
    parser.add_argument("--settings", default="shared,pinned")
    parser.add_argument("--quick", action="store_true", help="seconds, not minutes: a smoke run")
    parser.add_argument("--out", default=str(RESULTS), help="folder for serving_overload.{json,md}")
    args = parser.parse_args()
    from polysense.machine import machine

    settings = args.settings.split(",")
    if "pinned" in settings and not {SERVER_CORE, LOADGEN_CORE} <= os.sched_getaffinity(0):
        raise SystemExit(f"pinning needs cores {LOADGEN_CORE} and {SERVER_CORE}")
    closed_s, overload_s = (1.0, 2.0) if args.quick else (10.0, 15.0)
    report: dict = {"command": COMMAND, "machine": machine(), "quick": args.quick, "runs": []}
    report["load_average_before"] = os.getloadavg()[0]  # other work on the machine shows here
    for setting in settings:
        for delay in (float(d) for d in args.delays.split(",")):
            report["runs"].append(run(args.bundle, setting, delay, closed_s, overload_s))
    report["load_average_after"] = os.getloadavg()[0]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "serving_overload.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "serving_overload.md").write_text(markdown(report))
    print(markdown(report))


def markdown(report: dict) -> str:
    from polysense.machine import describe

    quick = " (--quick: a smoke run, not a measurement)" if report["quick"] else ""
    lines = [
        "# polysense serve under 4x overload: admission at the head and by expected wait",
        "",
        f"Command: `{report['command']}`{quick}.",
        f"Machine: {describe(report['machine'])}, 1-minute load average {_load(report)} (other work on the "
        "machine makes every figure worse). Text predictions on the built-in bundle, HTTP/1.1 keep-alive "
        "on loopback. shared: server and load generator on every core; pinned: server on core "
        f"{SERVER_CORE}, load generator on core {LOADGEN_CORE}. The open loop runs on 512 connections opened "
        "before it starts (loadgen --preopen). Latency from the scheduled start (no "
        "coordinated omission; p99 from send leaves the generator's own lag out); the target is accepted p99 "
        "<= 10x the unloaded (1 client) p50 of the same setting. 503s at 8 and 32 clients: closed-loop clients "
        "that resend at once, ignoring Retry-After. CPU: cores the load generator and the server used during "
        "the overload.",
        "",
        "| setting | --max-queue-delay-ms | unloaded p50 ms | 8 clients req/s (503s) | 32 clients req/s (503s) "
        "| offered req/s | answered 200/s | refused 503/s | not sent | accepted p50 ms | accepted p99 ms "
        "| p99 from send ms | p99 / unloaded p50 | target met | CPU generator / server |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["runs"]:
        one, eight, many = r["closed"]
        o = r["overload"]
        delay = "0 (off)" if not r["max_queue_delay_ms"] else f"{r['max_queue_delay_ms']:g}"
        lines.append(
            f"| {r['setting']} | {delay} | {one['p50_ms']:.2f} | {eight['throughput_rps']:.0f} ({eight['rejected']}) "
            f"| {many['throughput_rps']:.0f} ({many['rejected']}) | {o['offered_rps']:.0f} "
            f"| {o['throughput_rps']:.0f} | {o['rejected'] / o['seconds']:.0f} | {o['not_sent']} | {o['p50_ms'] or 0:.2f} "
            f"| {o['p99_ms'] or 0:.2f} | {o['p99_from_send_ms'] or 0:.2f} | {r['ratio']:.1f} | {'yes' if r['ratio'] <= 10 else '**no**'} "
            f"| {o.get('loadgen_cpu_cores', 0):.2f} / {o.get('server_cpu_cores', 0):.2f} |"
        )
    return "\n".join(lines) + "\n"


def _load(report: dict) -> str:
    if "load_average_before" not in report:
        return "not recorded"
    return f"{report['load_average_before']:.2f} before, {report['load_average_after']:.2f} after"


if __name__ == "__main__":
    main()
