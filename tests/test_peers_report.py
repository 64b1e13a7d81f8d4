"""The report of `make bench-peers` (benchmarks/peers_report.py) on tiny made-up results: which peer is fastest,
polysense's speed-up over it, the targets of issue 42 and the tables. The benchmark itself (torch, OpenVINO)
is not part of the suite; its report code is, in the fast tier."""

import pytest

from benchmarks.peers_report import (
    ARGMAX,
    POLYSENSE,
    REFERENCE,
    WHOLE,
    best_of,
    comparison,
    components_of,
    fastest_peer,
    markdown,
    samples_per_second,
    targets,
)


def _stats(p50_ms: float, stable: bool = True) -> dict:
    return {"p50_ms": p50_ms, "p99_ms": p50_ms * 1.5, "stable": stable}


def _setting(
    threads: int, batch: int, times: dict[str, dict[str, float]], errors: dict | None = None
) -> dict:
    latency = {
        engine: {c: _stats(ms) for c, ms in by_component.items()} for engine, by_component in times.items()
    }
    return {
        "threads": threads,
        "batch": batch,
        "latency": latency,
        "errors": errors or {},
        "load_average": 0.25,
    }


def _results() -> dict:
    """Two engines besides polysense, one thread and two, batch 1 and 32; openvino failed on the fusion head at
    one thread, batch 1."""
    return {
        "engines": {
            POLYSENSE: {"label": "the runtime", "precisions": {"image_encoder": "int8", "fusion": "fp32"}},
            REFERENCE: {
                "label": "plain onnxruntime",
                "precisions": {"image_encoder": "fp32", "fusion": "fp32"},
            },
            "openvino_f32": {"label": "OpenVINO", "precisions": {"image_encoder": "f32", "fusion": "f32"}},
        },
        "unavailable": {"torch_compile": "no compiler"},
        "settings": [
            _setting(
                1,
                1,
                {
                    POLYSENSE: {"image_encoder": 2.0, "fusion": 0.1, WHOLE: 2.0},
                    REFERENCE: {"image_encoder": 4.0, "fusion": 0.05, WHOLE: 4.0},
                    "openvino_f32": {"image_encoder": 3.0, WHOLE: 3.0},
                },
                errors={"openvino_f32": {"fusion": "RuntimeError: no"}},
            ),
            _setting(
                2,
                1,
                {
                    POLYSENSE: {"image_encoder": 1.5, "fusion": 0.1, WHOLE: 1.6},
                    REFERENCE: {"image_encoder": 2.5, "fusion": 0.1, WHOLE: 2.6},
                    "openvino_f32": {"image_encoder": 1.8, "fusion": 0.1, WHOLE: 1.9},
                },
            ),
            _setting(
                1,
                32,
                {
                    POLYSENSE: {"image_encoder": 40.0, "fusion": 0.5, WHOLE: 50.0},
                    REFERENCE: {"image_encoder": 80.0, "fusion": 0.5, WHOLE: 90.0},
                    "openvino_f32": {"image_encoder": 45.0, "fusion": 0.5, WHOLE: 55.0},
                },
            ),
        ],
        "parity": {
            POLYSENSE: {"image_encoder": 0.01, "fusion": 0.0, WHOLE: 0.02, ARGMAX: 1.0},
            REFERENCE: {"image_encoder": 0.0, "fusion": 0.0, WHOLE: 0.0, ARGMAX: 1.0},
            "openvino_f32": {"image_encoder": 1e-5, WHOLE: 1e-5, ARGMAX: 0.96875},
        },
    }


def _table(markdown_text: str, heading: str, key_cells: int = 1) -> dict[str, list[str]]:
    """The rows of the first table after `heading`, by their first `key_cells` cells joined by " / " (the rule
    row left out)."""
    rows: dict[str, list[str]] = {}
    lines = markdown_text.splitlines()
    for line in lines[lines.index(heading) + 1 :]:
        if line.startswith("|"):
            cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
            if set(line) - set("|-: "):
                rows[" / ".join(cells[:key_cells])] = cells[key_cells:]
        elif rows:
            break
    return rows


def test_samples_per_second():
    assert samples_per_second(2.0, 1) == pytest.approx(500.0)
    assert samples_per_second(64.0, 32) == pytest.approx(500.0)


def test_fastest_peer_leaves_polysense_out_and_skips_what_a_peer_did_not_measure():
    one_thread = _results()["settings"][0]
    assert fastest_peer(one_thread, "image_encoder") == ("openvino_f32", 3.0)  # polysense's 2.0 is no peer
    assert fastest_peer(one_thread, "fusion") == (REFERENCE, 0.05)  # openvino failed on it
    assert fastest_peer(one_thread, "audio_encoder") is None


def test_comparison_is_the_peers_time_over_polysense():
    one_thread = _results()["settings"][0]
    compared = comparison(one_thread, "image_encoder")
    assert compared == {"peer": "openvino_f32", "peer_ms": 3.0, "polysense_ms": 2.0, "speedup": 1.5}
    assert comparison(one_thread, "fusion")["speedup"] == pytest.approx(0.5)  # polysense slower: below 1
    assert comparison(one_thread, "audio_encoder") is None


def test_components_keep_the_bundle_order_and_end_with_the_whole_model():
    assert components_of(_results()) == ["image_encoder", "fusion", WHOLE]


def test_best_configuration_is_taken_over_engines_and_thread_counts():
    results = _results()
    assert best_of(results, 1, peers=True) == ("openvino_f32", 2, 1.9)
    assert best_of(results, 1, peers=False) == (POLYSENSE, 2, 1.6)
    assert best_of(results, 32, peers=True) == ("openvino_f32", 1, 55.0)
    assert best_of(results, 8, peers=True) is None


def test_targets_per_thread_count_and_best_against_best():
    rows = {(row["batch"], row["threads"]): row for row in targets(_results())}
    assert set(rows) == {(1, "1"), (1, "2"), (1, "best: 2 against 2"), (32, "1"), (32, "best: 1 against 1")}
    one = rows[(1, "1")]
    assert (one["peer"], one["speedup"], one["target"], one["met"]) == ("openvino_f32", 1.5, 1.3, True)
    two = rows[(1, "2")]
    assert two["speedup"] == pytest.approx(1.9 / 1.6) and two["met"] is False
    assert rows[(1, "best: 2 against 2")]["speedup"] == pytest.approx(1.9 / 1.6)
    batch32 = rows[(32, "1")]
    assert batch32["target"] == 1.2 and batch32["speedup"] == pytest.approx(1.1) and batch32["met"] is False


def test_a_target_without_polysense_is_not_measured():
    results = _results()
    del results["settings"][0]["latency"][POLYSENSE][WHOLE]
    row = next(r for r in targets(results) if (r["batch"], r["threads"]) == (1, "1"))
    assert row["speedup"] is None and row["met"] is None


def test_markdown_tables_carry_the_numbers():
    meta = {
        "machine": "AMD EPYC, 2 CPUs, avx2",
        "command": "make bench-peers",
        "bundle": "runs/pretrained/bundle",
        "versions": {"polysense": "0.1", "openvino": "2026.4"},
        "openvino_cpu": ["BF16", "FP32", "INT8"],
        "load_average": {"before": 0.5, "after": 0.75},
        "quick": True,
    }
    text = markdown(_results(), meta)
    assert "`make bench-peers`" in text and "AMD EPYC, 2 CPUs, avx2" in text and "openvino 2026.4" in text
    assert "smoke run" in text
    assert "reports BF16, FP32, INT8" in text and "before and after: 0.50, 0.75" in text
    engines = _table(text, "| engine | what runs | precision per component |")
    assert engines["torch_compile"][0] == "not measured: no compiler"
    assert engines[POLYSENSE][1] == "image_encoder int8, fusion fp32"

    one_thread = _table(text, "### Batch 1, 1 thread")
    assert one_thread["engine"] == ["image_encoder", "fusion", WHOLE]
    assert "Load average (1 minute) at its start: 0.25." in text
    assert one_thread[POLYSENSE][0] == "2.000 ms, 500/s"
    assert one_thread["openvino_f32"][1] == "failed"
    assert one_thread["fastest peer"] == ["openvino_f32", REFERENCE, "openvino_f32"]
    assert one_thread[f"{POLYSENSE} speed-up over it"] == ["**1.50x**", "**0.50x**", "**1.50x**"]
    assert "- failed: openvino_f32, fusion: RuntimeError: no" in text
    assert _table(text, "### Batch 32, 1 thread")[REFERENCE][2] == "90.000 ms, 356/s"

    goals = _table(text, "## Targets", key_cells=2)
    assert goals["1 / 1"] == ["openvino_f32", "1.50x", ">= 1.3x", "met"]
    assert goals["1 / 2"][1:] == ["1.19x", ">= 1.3x", "**missed**"]
    assert goals["1 / best: 2 against 2"][0] == "openvino_f32"
    assert goals["32 / 1"][1:] == ["1.10x", ">= 1.2x", "**missed**"]

    parity = _table(text, "## Parity")
    assert parity["openvino_f32"] == ["1.00e-05", "-", "1.00e-05", "96.9 %"]


def test_an_unstable_measurement_is_marked():
    results = _results()
    results["settings"][1]["latency"][REFERENCE]["fusion"]["stable"] = False
    row = _table(
        markdown(results, {"machine": "m", "command": "c", "bundle": "b", "versions": {}}),
        "### Batch 1, 2 threads",
    )
    assert row[REFERENCE][1].endswith("~")
    assert not row[POLYSENSE][1].endswith("~")
