"""The report of `make bench-peers` (benchmarks/peers.py): which peer is fastest, polysense's ratio to it, the
targets of issue 42 and the Markdown tables.

Pure functions on the results' dicts, importable without torch, onnxruntime or OpenVINO, so the fast test tier
checks them on tiny made-up results (tests/test_peers_report.py).

Results: {"engines": {name: {"label", "precisions"}}, "unavailable": {name: reason}, "settings": [{"threads",
"batch", "latency": {engine: {component: measure() statistics}}, "errors": {engine: {component: message}}}],
"parity": {engine: {component: max abs difference, ARGMAX: share}}}; components are the bundle's (image_encoder,
..., fusion) and WHOLE, the encoders and the fusion head of one call.
"""

from __future__ import annotations

POLYSENSE = "polysense_auto"  # the engine the peers are measured against
REFERENCE = "onnxruntime_fp32"  # parity is measured against its outputs
WHOLE = (
    "encoders + fusion"  # polysense.tools.bench.MODELS_STAGE: one call of every encoder and the fusion head
)
ARGMAX = "argmax_agreement"  # parity: the share of samples whose logits' argmax equals the reference's
# Issue 42: batch 1, encoders + fusion, polysense auto at least 1.3x faster than the fastest peer; batch 32, at
# least 1.2x its throughput.
TARGETS = {1: 1.3, 32: 1.2}


def samples_per_second(p50_ms: float, batch: int) -> float:
    """Throughput of a call that takes `p50_ms` for `batch` samples."""
    return batch * 1000.0 / p50_ms


def fastest_peer(setting: dict, component: str) -> tuple[str, float] | None:
    """(engine, p50 ms) of the peer with the lowest median on `component` in one setting; None when no peer
    measured it."""
    times = {
        engine: by_component[component]["p50_ms"]
        for engine, by_component in setting["latency"].items()
        if engine != POLYSENSE and component in by_component
    }
    if not times:
        return None
    best = min(times, key=lambda engine: times[engine])
    return best, times[best]


def comparison(setting: dict, component: str) -> dict | None:
    """polysense auto against the fastest peer on one component: both medians and the speed-up (the peer's
    time over polysense's, so above 1 polysense is faster); None when either side is missing."""
    peer = fastest_peer(setting, component)
    ours = setting["latency"].get(POLYSENSE, {}).get(component)
    if peer is None or ours is None:
        return None
    return {
        "peer": peer[0],
        "peer_ms": peer[1],
        "polysense_ms": ours["p50_ms"],
        "speedup": peer[1] / ours["p50_ms"],
    }


def components_of(results: dict) -> list[str]:
    """Every component measured in any setting, the bundle's order kept, WHOLE last."""
    seen: list[str] = []
    for setting in results["settings"]:
        for by_component in setting["latency"].values():
            seen += [c for c in by_component if c not in seen and c != WHOLE]
    return [*seen, WHOLE]


def best_of(results: dict, batch: int, peers: bool) -> tuple[str, int, float] | None:
    """(engine, threads, p50 ms) of the fastest configuration on WHOLE at `batch`: among the peers (every
    engine and thread count) or, with peers=False, polysense auto at its best thread count."""
    found = []
    for setting in (s for s in results["settings"] if s["batch"] == batch):
        for engine, by_component in setting["latency"].items():
            if (engine != POLYSENSE) == peers and WHOLE in by_component:
                found.append((engine, setting["threads"], by_component[WHOLE]["p50_ms"]))
    return min(found, key=lambda row: row[2]) if found else None


def _target_row(batch: int, threads: str, peer: str | None, speedup: float | None) -> dict:
    target = TARGETS[batch]
    met = None if speedup is None else speedup >= target
    return {
        "batch": batch,
        "threads": threads,
        "peer": peer,
        "speedup": speedup,
        "target": target,
        "met": met,
    }


def targets(results: dict) -> list[dict]:
    """Each target of issue 42 on WHOLE, per thread count (polysense and the peers on the same count) and best
    configuration against best configuration: the speed-up, the target and whether it is met (None where a side
    was not measured)."""
    rows = []
    for batch in TARGETS:
        for setting in (s for s in results["settings"] if s["batch"] == batch):
            compared = comparison(setting, WHOLE)
            peer, speedup = (compared["peer"], compared["speedup"]) if compared else (None, None)
            rows.append(_target_row(batch, str(setting["threads"]), peer, speedup))
        ours, theirs = best_of(results, batch, peers=False), best_of(results, batch, peers=True)
        if ours and theirs:
            threads = f"best: {ours[1]} against {theirs[1]}"
            rows.append(_target_row(batch, threads, theirs[0], theirs[2] / ours[2]))
    return rows


def _cell(stats: dict | None, batch: int, error: str | None) -> str:
    if stats is None:
        return "failed" if error else "-"
    mark = "" if stats.get("stable", True) else " ~"
    return f"{stats['p50_ms']:.3f} ms, {samples_per_second(stats['p50_ms'], batch):,.0f}/s{mark}"


def setting_table(results: dict, setting: dict) -> list[str]:
    """One setting's table: an engine a row, a component a column (p50 ms per call and samples/s), then the
    fastest peer and polysense auto's speed-up over it, per component."""
    components = components_of(results)
    batch = setting["batch"]
    lines = [
        f"### Batch {batch}, {setting['threads']} thread{'s' if setting['threads'] != 1 else ''}",
        "",
        *(
            [f"Load average (1 minute) at its start: {setting['load_average']:.2f}.", ""]
            if "load_average" in setting
            else []
        ),
        "| engine | " + " | ".join(components) + " |",
        "|---|" + "---:|" * len(components),
    ]
    for engine in results["engines"]:
        measured = setting["latency"].get(engine, {})
        errors = setting.get("errors", {}).get(engine, {})
        cells = [_cell(measured.get(c), batch, errors.get(c)) for c in components]
        lines.append(f"| {engine} | " + " | ".join(cells) + " |")
    fastest, ratios = [], []
    for component in components:
        compared = comparison(setting, component)
        fastest.append(compared["peer"] if compared else "-")
        ratios.append(f"**{compared['speedup']:.2f}x**" if compared else "-")
    lines.append("| fastest peer | " + " | ".join(fastest) + " |")
    lines.append(f"| {POLYSENSE} speed-up over it | " + " | ".join(ratios) + " |")
    return lines


def parity_table(results: dict) -> list[str]:
    components = components_of(results)
    lines = [
        f"| engine | max abs difference from {REFERENCE}: "
        + " | ".join(components)
        + " | argmax agreement |",
        "|---|" + "---:|" * (len(components) + 1),
    ]
    for engine, parity in results["parity"].items():
        cells = [f"{parity[c]:.2e}" if c in parity else "-" for c in components]
        agreement = f"{parity[ARGMAX] * 100:.1f} %" if ARGMAX in parity else "-"
        lines.append(f"| {engine} | " + " | ".join(cells) + f" | {agreement} |")
    return lines


def _verdict(met: bool | None) -> str:
    return "not measured" if met is None else ("met" if met else "**missed**")


def target_table(results: dict) -> list[str]:
    lines = [
        f"| batch | threads | fastest peer on {WHOLE} | {POLYSENSE} speed-up | target | |",
        "|---:|---|---|---:|---:|---|",
    ]
    for row in targets(results):
        speedup = "-" if row["speedup"] is None else f"{row['speedup']:.2f}x"
        lines.append(
            f"| {row['batch']} | {row['threads']} | {row['peer'] or '-'} | {speedup} | "
            f">= {row['target']}x | {_verdict(row['met'])} |"
        )
    return lines


def markdown(results: dict, meta: dict) -> str:
    """The whole report: what ran where, the targets, a table per setting, parity, what could not run."""
    versions = ", ".join(f"{name} {version}" for name, version in meta["versions"].items())
    lines = [
        f"# polysense against peer engines ({meta['machine']})",
        "",
        f"Command: `{meta['command']}`; {versions}. Bundle `{meta['bundle']}`; the same preprocessed test-split "
        f"samples for every engine. Medians of windows repeated until they agree (polysense.tools.bench.measure); "
        f"`~`: the windows never agreed.",
        "",
    ]
    if meta.get("openvino_cpu"):
        lines += [f"OpenVINO's CPU plugin reports {', '.join(meta['openvino_cpu'])} for this CPU.", ""]
    if "load_average" in meta:
        load = meta["load_average"]
        lines += [f"Load average (1 minute) before and after: {load['before']:.2f}, {load['after']:.2f}.", ""]
    if meta.get("quick"):
        lines += ["**--quick: a smoke run, not a measurement.**", ""]
    lines += ["| engine | what runs | precision per component |", "|---|---|---|"]
    for engine, info in results["engines"].items():
        precisions = ", ".join(f"{c} {p}" for c, p in info["precisions"].items())
        lines.append(f"| {engine} | {info['label']} | {precisions} |")
    for engine, reason in results.get("unavailable", {}).items():
        lines.append(f"| {engine} | not measured: {reason} | |")
    lines += ["", "## Targets", "", *target_table(results), ""]
    for setting in results["settings"]:
        lines += [*setting_table(results, setting), ""]
        failed = [
            f"- failed: {engine}, {component}: {message}"
            for engine, errors in setting.get("errors", {}).items()
            for component, message in errors.items()
        ]
        lines += [*failed, ""] if failed else []
    lines += ["## Parity", "", *parity_table(results)]
    return "\n".join(lines) + "\n"
