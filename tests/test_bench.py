"""`polysense bench` and the benchmark scripts (the package `benchmarks`; pytest puts the repository root on the
import path). Reports are checked by their values (numbers, keys, order of rows), read back from the JSON or from
the markdown tables by `_table`, not by their layout."""

import contextlib
import json

import pytest

pytest.importorskip("onnxruntime")


def _table(markdown: str) -> dict[str, list[str]]:
    """The rows of the markdown tables in `markdown`, by first cell, in order (header and rule rows included)."""
    rows = {}
    for line in markdown.splitlines():
        if line.startswith("|") and set(line) - set("|-: "):
            cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
            rows[cells[0]] = cells[1:]
    return rows


def _numbers(cells: list[str]) -> list[float]:
    """The cells that are numbers, as numbers."""
    numbers = []
    for cell in cells:
        with contextlib.suppress(ValueError):
            numbers.append(float(cell))
    return numbers


def test_bench_reports_every_field(bundle, tmp_path, capsys):
    from polysense.cli.main import main

    out, plot = tmp_path / "bench.json", tmp_path / "bench.png"
    pytest.importorskip("matplotlib")
    args = ["bench", str(bundle), "--quick", "--no-progress", "--json", str(out), "--plot", str(plot)]
    assert main(args) == 0
    assert "end to end" in capsys.readouterr().out
    report = json.loads(out.read_text())
    expected_stages = {f"{kind}_{m}" for kind in ("preprocess", "encode") for m in ("image", "text", "audio")}
    assert set(report["stages"]) == expected_stages | {"fusion", "encoders + fusion"}
    assert isinstance(report["machine"]["isa"], list)  # the CPU's vector instruction sets, recorded
    for stats in [*report["stages"].values(), report["end_to_end"]]:
        assert {"p50_ms", "p90_ms", "p99_ms", "mean_ms", "runs", "stable", "windows"} <= set(stats)
        assert 0 < stats["p50_ms"] <= stats["p90_ms"] <= stats["p99_ms"]
    assert set(report["throughput_samples_per_s"]) == {"1", "4"}
    assert report["cold_start"]["seconds"] > 0 and report["cold_start"]["peak_rss_mb"] > 0
    assert report["peak_rss_mb"] > 0 and 0 <= report["orchestration_overhead_share"] < 1
    assert {"fp32", "int8", "fp16", "loaded"} <= set(report["bundle_bytes"])
    assert set(report["precisions"]) == {"image_encoder", "text_encoder", "audio_encoder", "fusion"}
    assert plot.stat().st_size > 1000


def test_windows_that_never_agree_are_reported():
    import itertools

    from polysense.tools.bench import BenchOptions, measure

    durations = itertools.cycle([0.0, 0.002])  # alternate windows of fast and slow runs
    state = {"delay": 0.0, "count": 0}

    def unstable():
        state["count"] += 1
        if state["count"] % 5 == 1:
            state["delay"] = next(durations)
        import time

        time.sleep(state["delay"])

    result = measure(unstable, BenchOptions(warmup_runs=0, window_runs=5, max_windows=4, tolerance=0.01))
    assert result["stable"] is False and result["windows"] == 4


@pytest.mark.slow
def test_pytorch_comparison_runs_in_small_mode(trained_run, exported_bundle, tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    pytest.importorskip("torch")
    pytest.importorskip("matplotlib")
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "vs_pytorch.py"
    subprocess.run(
        [
            sys.executable,
            str(script),
            "--run",
            str(trained_run),
            "--bundle",
            str(exported_bundle),
            "--quick",
            "--out",
            str(tmp_path),
        ],
        check=True,
        capture_output=True,
    )
    results = json.loads((tmp_path / "vs_pytorch.json").read_text())["results"]
    for engine in ("pytorch_eager", "runtime_fp32", "runtime_auto"):
        assert {"models", "end_to_end"} <= set(results[engine])
        assert results[engine]["models"]["p50_ms"] > 0
    assert set(results["int8_variants"]) == {"image_encoder", "text_encoder", "audio_encoder", "fusion"}
    assert {
        "models_auto_vs_eager",
        "end_to_end_auto_vs_eager",
        "orchestration_overhead_share",
        "cold_start_seconds",
        "int8_bundle_share_of_fp32",
    } <= set(results["ratios"])
    assert all(results["ratios"][key] > 0 for key in ("models_auto_vs_eager", "end_to_end_auto_vs_eager"))
    assert 0 <= results["ratios"]["orchestration_overhead_share"] < 1
    assert (tmp_path / "vs_pytorch.md").stat().st_size > 0
    assert (tmp_path / "vs_pytorch.png").stat().st_size > 1000


def test_bench_runs_where_torch_and_onnx_cannot_be_imported(bundle):
    from blocking import run_blocked

    result = run_blocked(
        ("torch", "onnx", "onnxscript"),
        f"""
        import sys
        from polysense.cli.main import main
        sys.exit(main(["bench", {str(bundle)!r}, "--quick", "--no-progress"]))
        """,
    )
    assert result.returncode == 0, result.stderr
    assert "end to end" in result.stdout


@pytest.mark.slow
def test_loso_audio_merge_keeps_earlier_speakers_and_refuses_other_machines(tmp_path, monkeypatch):
    """`loso_audio.py --merge` finishes a long run in parts: speakers not run again keep their results, and
    results from another kind of machine or another training seed are refused rather than mixed in."""
    from pathlib import Path

    from benchmarks.avdigits import loso_audio  # imports the training code: needs torch

    scores = {"nicolas": 0.7, "theo": 0.9}
    monkeypatch.setattr(loso_audio, "build", lambda work, speaker: Path(speaker))
    monkeypatch.setattr(
        loso_audio,
        "fit",
        lambda manifest, *a, seed, **k: {
            "accuracy": scores[str(manifest)] - seed,
            "macro_f1": 0.5,
            "count": 500,
        },
    )
    earlier = {
        "configs": {"causal": {"audio_encoder": "causal", "epochs": 15}},
        "speakers": {
            s: {"causal": {"accuracy": 0.6, "macro_f1": 0.6, "count": 500, "train_seconds": 100.0}}
            for s in ("george", "jackson", "lucas")
        },
        "machine": loso_audio.machine(),
    }
    (tmp_path / "loso_audio.json").write_text(json.dumps(earlier))
    previous = loso_audio.results_from_this_machine(tmp_path / "loso_audio.json")
    causal = next(c for c in loso_audio.CONFIGS if c.name == "causal")
    results = loso_audio.run(tmp_path, ("theo", "nicolas"), (causal,), tmp_path, previous, "python again")

    assert set(results["speakers"]) == {"george", "jackson", "lucas", "nicolas", "theo"}
    assert results["speakers"]["theo"]["causal"]["accuracy"] == 0.9
    assert results["commands"] == ["make bench-avdigits-audio", "python again"] and results["seed"] == 0
    table = _table((tmp_path / "loso_audio.md").read_text())
    speakers = ["george", "jackson", "lucas", "nicolas", "theo"]
    assert [row for row in table if row in {*speakers, "mean"}] == [*speakers, "mean"]  # the dataset's order
    assert _numbers(table["mean"])[0] == pytest.approx(0.68)  # (3 * 0.6 + 0.7 + 0.9) / 5
    assert _numbers(table["theo"])[0] == pytest.approx(0.9)
    with pytest.raises(SystemExit, match="for seed 0, not 1"):
        loso_audio.run(tmp_path, ("theo",), (causal,), tmp_path, results, "python seed 1", seed=1)

    earlier["machine"] = {**earlier["machine"], "isa": ["sse2"]}
    (tmp_path / "loso_audio.json").write_text(json.dumps(earlier))
    with pytest.raises(SystemExit, match="another kind of machine"):
        loso_audio.results_from_this_machine(tmp_path / "loso_audio.json")


@pytest.mark.slow
def test_loso_audio_scores_adaptive_voices_by_position_in_their_sessions():
    """The adaptive-voice check: sessions start afresh, each batch is heard in order, and the table shows
    the positions apart (results from before adaptive voices still render, without those columns)."""
    from types import SimpleNamespace

    from benchmarks.avdigits import loso_audio  # imports the training code: needs torch

    class Voice:
        heard = 0

    class Pipeline:  # right from the second recording of a session on, as if the voice needed one to learn
        def adaptive_voice(self):
            return Voice()

        def predict_batch(self, samples):
            out = []
            for sample in samples:
                out.append(SimpleNamespace(label=sample["audio"] if sample["voice"].heard else "?"))
                sample["voice"].heard += 1
            return out

    rows = [SimpleNamespace(audio=str(i % 10), label=str(i % 10)) for i in range(50)]
    scores = loso_audio.adaptive_sessions(Pipeline(), rows, session=20)
    assert scores["accuracy_adaptive_1_1"] == 0.0 and scores["accuracy_adaptive_2_5"] == 1.0
    assert scores["accuracy_adaptive"] == 0.94  # 3 sessions (20, 20, 10): their first recordings wrong

    entry = {"accuracy": 0.8, "accuracy_10_clips": 0.79, "accuracy_no_profile": 0.6, "macro_f1": 0.8}
    results = {
        "configs": {"v": {"voice_norm": True, "epochs": 25}},
        "speakers": {"theo": {"v": {**entry, **scores, "train_seconds": 1.0}}},
        "machine": loso_audio.machine(),
    }
    theo = _numbers(_table(loso_audio.markdown(results))["theo"])
    assert theo == pytest.approx([0.8, 0.79, 0.6, 0.94, 0.0, 1.0, 1.0])
    results["speakers"]["theo"]["v"] = {**entry, "train_seconds": 1.0}
    assert _numbers(_table(loso_audio.markdown(results))["theo"]) == pytest.approx([0.8, 0.79, 0.6])


def test_streaming_benchmark_writes_named_results(bundle, fsdd_file, tmp_path):
    """benchmarks/streaming.py in small mode: every frame encoded once (asserted inside), streaming equal to
    offline, and the results under the requested name with the audio encoder they measured."""
    import subprocess
    import sys
    from pathlib import Path

    arguments = ["--bundle", str(bundle), "--seconds", "3", "--repeats", "1", "--out", str(tmp_path)]
    arguments += ["--name", "streaming_small", "--command", "pytest"]
    root = Path(__file__).resolve().parents[1]
    subprocess.run(
        [sys.executable, "-m", "benchmarks.streaming", *arguments], check=True, capture_output=True, cwd=root
    )
    results = json.loads((tmp_path / "streaming_small.json").read_text())
    assert results["meta"]["command"] == "pytest"
    for result in results["results"]:
        assert set(result["chunks"]) == {"20", "100", "500"}
        assert result["versus_offline"]["max_abs_embedding_difference"] < 1e-4
        assert result["audio_encoder"]["inputs"][0] == "frames"
    assert (tmp_path / "streaming_small.md").stat().st_size > 0


def _image_result(
    photos: int, accuracy: float, misread: tuple[str, str, str], rows: int, epochs: int
) -> dict:
    """One model's entry in the image benchmark's results, with one misread photo (photo, label, predicted)."""
    photo, label, predicted = misread
    return {
        "held_out_photos": {
            "photos": photos,
            "accuracy": accuracy,
            "misread": [{"photo": photo, "label": label, "predicted": predicted}],
        },
        "test_rows": {"accuracy": accuracy, "macro_f1": 0.5, "count": rows},
        "train_seconds": 90.0,
        "epochs_run": epochs,
    }


@pytest.mark.slow
def test_image_benchmark_counts_each_held_out_photo_once(tmp_path):
    """The AV-digits test split shows a held-out photo once per recording paired with it; the image benchmark
    scores distinct photos, and names those misread."""
    from pathlib import Path

    from benchmarks.avdigits import image_only as image  # imports the training code: needs torch

    manifest = tmp_path / "manifest.csv"
    manifest.write_text(
        "image,label,split\n"
        + "".join(
            f"{name}.jpg,{label},{split}\n"
            for name, label, split in [
                ("a", "1", "train"),
                ("b", "1", "test"),
                ("c", "2", "test"),
                ("b", "1", "test"),
                ("d", "2", "val"),
            ]
        )
    )
    for name in "abcd":
        (tmp_path / f"{name}.jpg").write_bytes(b"")
    photos = image.held_out_photos(manifest)
    assert [(Path(p).name, label) for p, label in photos] == [("b.jpg", "1"), ("c.jpg", "2")]

    entry = _image_result(photos=2, accuracy=0.5, misread=("2/c.jpg", "2", "7"), rows=3, epochs=6)
    entry["test_rows"]["accuracy"] = 0.6667
    text = image.markdown({"seed": 0, "configs": {}, "models": {"cnn": entry}, "machine": {"cpus": 2}})
    cnn = _table(text)["cnn"]
    assert _numbers(cnn)[:3] == pytest.approx([0.5, 0.6667, 6])  # photo accuracy, test rows, epochs
    assert "1 of 2" in cnn  # photos misread, of those held out
    assert "2/c.jpg" in text  # the misread photo is named


def test_sst2_benchmark_reports_the_mean_over_seeds_and_merges_only_same_machine_results(tmp_path):
    from benchmarks import sst2

    def run(accuracy: float) -> dict:
        return {
            "dev_accuracy": accuracy,
            "dev_macro_f1": accuracy,
            "train_seconds": 60.0,
            "epochs_run": 3,
            "best_epoch": 2,
        }

    results = {
        "machine": sst2.machine(),
        "runs": {
            "minilm_finetuned": run(0.87),
            "minilm_finetuned_seed1": run(0.88),
            "minilm_finetuned_seed2": run(0.89),
        },
    }
    text = sst2.markdown(results)
    assert _numbers(_table(text)["MiniLM-L6, fine-tuned, seed 2"])[0] == pytest.approx(0.89)
    mean = text.split("mean dev accuracy")[1].split()[0]  # over the 3 training seeds
    assert float(mean) == pytest.approx(0.88)

    (tmp_path / "sst2.json").write_text(json.dumps(results))
    assert sst2.results_from_this_machine(tmp_path / "sst2.json") == results
    results["machine"] = {**results["machine"], "isa": ["sse2"]}
    (tmp_path / "sst2.json").write_text(json.dumps(results))
    with pytest.raises(SystemExit, match="another kind of machine"):
        sst2.results_from_this_machine(tmp_path / "sst2.json")
    with pytest.raises(SystemExit, match="run without --merge first"):
        sst2.results_from_this_machine(tmp_path / "missing.json")


def test_sst2_int8_benchmark_keeps_one_report_per_kind_of_machine(tmp_path):
    from benchmarks import sst2_int8

    amx = {"machine": {"cpus": 2, "isa": ["avx2", "amx_int8"]}, "sentences": 872}
    vnni = {"machine": {"cpus": 2, "isa": ["avx2", "avx512_vnni"]}, "sentences": 872}
    path = tmp_path / "sst2_int8.json"
    assert sst2_int8.measured_machines(path, vnni) == [vnni]  # nothing committed yet
    path.write_text(json.dumps(amx))  # the format before reports were kept per machine
    assert sst2_int8.measured_machines(path, vnni) == [amx, vnni]
    path.write_text(json.dumps({"machines": [amx, vnni]}))
    again = {**vnni, "sentences": 871}
    assert sst2_int8.measured_machines(path, again) == [amx, again]  # a run replaces only its own machine's


@pytest.mark.slow
def test_image_benchmark_merge_keeps_the_other_configurations_in_their_order(tmp_path, monkeypatch):
    from benchmarks.avdigits import image_only as image  # imports the training code: needs torch

    monkeypatch.setattr(image, "build", lambda work: work / "manifest.csv")
    monkeypatch.setattr(image, "held_out_photos", lambda manifest: [("b.jpg", "1")])
    monkeypatch.setattr(image, "fit", lambda *a, **k: {"accuracy": 1.0, "macro_f1": 1.0, "count": 1})
    monkeypatch.setattr(image, "export", lambda folder, variants: folder)
    scored = {"photos": 1, "accuracy": 1.0, "misread": []}
    monkeypatch.setattr(image, "photo_accuracy", lambda bundle, photos: scored)
    earlier_entry = _image_result(photos=1, accuracy=0.0, misread=("1/b.jpg", "1", "7"), rows=1, epochs=15)
    earlier = {"seed": 0, "configs": {"cnn": {"epochs": 15}}, "models": {"cnn": earlier_entry}}
    pretrained = next(c for c in image.CONFIGS if c.name == "efficientnet-lite0")
    results = image.run(tmp_path, (pretrained,), 0, tmp_path, earlier, "python image_only.py --merge")

    assert results["models"]["cnn"] == earlier_entry  # not run again, kept
    # Results from before commands were recorded came from the default command; this run's follows it.
    assert results["commands"] == [image.COMMAND, "python image_only.py --merge"]
    assert results["models"]["efficientnet-lite0"]["held_out_photos"] == scored
    assert results["seed"] == 0
    rows = [row for row in _table((tmp_path / "image_only.md").read_text()) if row in results["models"]]
    assert rows == ["efficientnet-lite0", "cnn"]  # CONFIGS order
    with pytest.raises(SystemExit, match="seed 0, not 1"):
        image.run(tmp_path, (pretrained,), 1, tmp_path, earlier)


@pytest.mark.slow
def test_channels_last_benchmark_times_both_layouts():
    """benchmarks/channels_last.py on the small CNN at 32 px: both layouts timed, the family's choice recorded."""
    from benchmarks import channels_last as benchmark  # imports the training code: needs torch

    results = [
        benchmark.measure("image", "cnn", 32, rounds=1),
        benchmark.measure("image", "efficientnet-lite0", 32, rounds=1),
        benchmark.measure("audio", "efficientnet-lite0", 20, rounds=1),
    ]
    assert [r["trains_channels_last"] for r in results] == [False, True, True]
    for r in results:
        assert r["default_s"] > 0 and r["channels_last_s"] > 0
        assert r["speedup"] == pytest.approx(r["default_s"] / r["channels_last_s"])
    report = {
        "command": "c",
        "machine": {"isa": []},
        "threads": 2,
        "batch": 64,
        "rounds": 1,
        "results": results,
    }
    row = _table(benchmark.markdown(report))["image efficientnet-lite0"]
    assert _numbers(row)[0] == 32 and row[1] == "yes"  # input size, trains channels-last


def test_the_machine_record_names_the_cpu_and_compares_kinds_of_machine():
    """Two CPUs with the same instruction sets can differ in speed and numerics (AVX-512 VNNI on AMD and on
    Intel), so the CPU's model is recorded and compared; results recorded before it was are compared on the rest."""
    from polysense.machine import describe, machine, same_kind

    here = machine()
    assert isinstance(here["model"], str) and here["model"]
    assert describe(here) == f"{here['model']}, {here['cpus']} CPUs, {'/'.join(here['isa']) or 'no AVX2'}"
    assert same_kind(dict(here), here)
    assert not same_kind({**here, "model": "another CPU"}, here)
    assert not same_kind({**here, "isa": ["sse2"]}, here)
    older = {key: value for key, value in here.items() if key != "model"}
    assert same_kind(older, here)
    assert describe(older).startswith("CPU model not recorded, ")
    assert describe({"cpus": 2}) == "CPU model not recorded, 2 CPUs, instruction sets not recorded"


@pytest.mark.slow
def test_pytorch_comparison_reports_the_median_round_with_every_rounds_ratio():
    """Eager, fp32 and auto are measured in rounds, in turn; the reported round is the one with the median
    auto-vs-eager ratio, and the table shows every round's ratio (a shared machine drifts between rounds)."""
    from benchmarks import vs_pytorch  # imports torch

    def measured(eager_ms: float) -> dict:
        timing = {"p50_ms": 2.0, "p99_ms": 2.5}
        engines = {"runtime_fp32": {"models": timing, "end_to_end": timing}}
        engines["runtime_auto"] = {"models": {"p50_ms": 1.0, "p99_ms": 1.5}, "end_to_end": timing}
        engines["pytorch_eager"] = {"models": {"p50_ms": eager_ms, "p99_ms": eager_ms}, "end_to_end": timing}
        return engines

    rounds = [measured(3.0), measured(5.0), measured(4.0)]
    chosen = vs_pytorch.median_round(rounds)
    assert chosen is rounds[2]
    ratios = {**vs_pytorch._ratios(chosen), "rounds": [vs_pytorch._ratios(r) for r in rounds]}
    assert ratios["models_auto_vs_eager"] == 4.0
    spread = vs_pytorch._spread(ratios, "models")
    assert [float(r) for r in spread.replace("x", "").split(":")[1].strip(" )").split(",")] == [3.0, 4.0, 5.0]
    assert vs_pytorch._spread({"models_auto_vs_eager": 4.0}, "models") == ""  # results from before rounds


@pytest.mark.slow
def test_every_loso_audio_configuration_is_a_valid_training_run():
    """A configuration with an option combination training refuses would fail only after an hour's run."""
    from benchmarks.avdigits import loso_audio  # imports the training code: needs torch
    from polysense.models.training.options import TrainOptions

    for config in loso_audio.CONFIGS:
        epochs = {"epochs": config.epochs} if config.epochs else {}
        options = TrainOptions(data="m.csv", out="run", modalities=("audio",), **epochs, **config.options)
        assert all(getattr(options, name) == value for name, value in config.options.items()), config.name


@pytest.mark.slow
def test_loso_ensemble_reuses_finished_runs_of_the_same_training_only(tmp_path, monkeypatch):
    """`loso_ensemble.py --reuse` takes a run loso_audio.py finished in the same folder only when its
    config.json asks for the same training (configuration, epochs, seed, data) and its bundle is there."""
    from benchmarks.avdigits import loso_ensemble  # imports the training code: needs torch
    from polysense.bundle.schema import DESCRIPTION_FILE

    manifest = tmp_path / "data_without_theo" / "manifest.csv"
    monkeypatch.setattr(loso_ensemble, "build", lambda work, speaker: manifest)
    trained = []

    def fit(data, out, epochs, modalities, seed, **options):
        trained.append((out.name, seed))
        out.mkdir(parents=True, exist_ok=True)
        settings = {**options, "epochs": epochs, "seed": seed, "data": str(data), "lr": 0.003}
        (out / "config.json").write_text(json.dumps({"options": settings}))
        (out / "metrics.json").write_text("{}")

    def export(run, variants):
        (run / "bundle").mkdir(exist_ok=True)
        (run / "bundle" / DESCRIPTION_FILE).write_text("{}")  # what the bundle writer names it

    def score(bundles, data, speaker, seeds):
        assert [b.parent.name for b in bundles] == [
            "loso_audio_causal-shape-voice-25-noise_theo",
            "loso_audio_causal-shape-voice-25-noise_theo_seed1",
        ]
        return {
            "single": {"0": 0.8, "1": 0.84},
            "ensemble": 0.86,
            "pairs": {},
            "ensemble_10_clips": 0.85,
            "ensemble_adaptive": 0.8,
            "count": 500,
        }

    for name, function in (("fit", fit), ("export", export), ("score", score)):
        monkeypatch.setattr(loso_ensemble, name, function)
    config = loso_ensemble.DEFAULT_CONFIG
    first = loso_ensemble.run(tmp_path, ("theo",), config, (0, 1), True, tmp_path / "out", "python first")
    assert len(trained) == 2 and set(first["speakers"]["theo"]["train_seconds"]) == {"0", "1"}
    trained.clear()
    again = loso_ensemble.run(tmp_path, ("theo",), config, (0, 1), True, tmp_path / "out", "python again")
    assert trained == [] and again["speakers"]["theo"]["train_seconds"] == {}
    table = (tmp_path / "out" / "loso_ensemble.md").read_text()
    assert "2 models were finished runs of the same training" in table and "Training time" not in table
    changed = tmp_path / "loso_audio_causal-shape-voice-25-noise_theo_seed1" / "config.json"
    changed.write_text(changed.read_text().replace('"epochs": 25', '"epochs": 15'))
    loso_ensemble.run(tmp_path, ("theo",), config, (0, 1), True, tmp_path / "out", "python changed")
    assert trained == [("loso_audio_causal-shape-voice-25-noise_theo_seed1", 1)]
    trained.clear()
    loso_ensemble.run(tmp_path, ("theo",), config, (0, 1), False, tmp_path / "out", "python anew")
    assert len(trained) == 2  # without --reuse everything trains again
    table = (tmp_path / "out" / "loso_ensemble.md").read_text()
    assert "python anew" in table
    rows = _table(table)
    assert _numbers(rows["theo"]) == pytest.approx([0.8, 0.84, 0.82, 0.86, 0.85, 0.8])
    assert "mean" not in rows  # one speaker of five: no mean over the speakers
    assert "mean over the 2 models this run trained" in table and "reused" not in table


@pytest.mark.slow  # ~30 s of live attacks: tests/test_hostile_clients.py covers the same attacks in the fast tier
def test_hostile_client_benchmark_runs_in_quick_mode(bundle, tmp_path):
    """benchmarks/hostile.py --quick against a real server: every condition measured, answers checked, each
    attacker met the limit it probes (431, 408, the stream's close), and the targets named per attack."""
    pytest.importorskip("starlette")
    pytest.importorskip("uvicorn")
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "hostile.py"
    command = [sys.executable, str(script), "--bundle", str(bundle), "--quick", "--window-s", "1", "--out"]
    subprocess.run([*command, str(tmp_path)], check=True, capture_output=True, timeout=300)
    report = json.loads((tmp_path / "serving_hostile.json").read_text())
    names = [row["condition"] for row in report["conditions"]]
    attacks = ["endless header", "slow headers", "lying Content-Length", "slow body", "idle connections"]
    assert names == ["no attack", *attacks, "idle WebSocket starts", "hang-ups mid-body", "no attack"]
    for row in report["conditions"]:
        assert row["answered_200"] > 0 and row["wrong"] == 0 and row["checked"] and row["server_alive"]
        assert row["throughput_ratio"] > 0 and row["p99_ratio"] > 0
        assert 0 < row["VmRSS_mb"] <= row["VmHWM_mb"] and row["rss_peak_mb"] > 0
    saw = {row["condition"]: row["attacker"] for row in report["conditions"]}
    assert saw["endless header"]["431"] > 0 and saw["slow headers"]["408"] > 0
    assert saw["idle connections"]["open_max"] == 125 and saw["hang-ups mid-body"]["hung up"] > 0
    assert saw["idle WebSocket starts"]["upgraded"] > 0
    assert len(report["targets"]) == 4 * 7 + 1 and report["server_log_tracebacks"] == 0
    assert (
        isinstance(report["machine"]["isa"], list)
        and report["fd_limit"]["soft"] >= report["fd_limit"]["soft_before"]
    )
    assert (tmp_path / "serving_hostile.md").read_text().startswith("# polysense serve under hostile clients")
