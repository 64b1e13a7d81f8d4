"""Distributed training (polysense train --nproc N): two gloo processes on CPU repeat one process with the same
global batch, a killed process fails the run cleanly, and --resume continues it with another process count.

Tolerance on weights: the two runs compute the same sums in another order (DDP averages two half-batch
gradients; SyncedBatchNorm's two-pass statistics against torch's kernel), which differs in the last bits of
float32. Adam divides each step by the gradient's running magnitude, so for weights whose gradients are near
zero those last bits become steps of up to the learning rate: measured up to 5e-4 of a tensor's largest value
after 3 epochs, and up to 4.4e-4 absolute (on BatchNorm biases whose values stay below 0.04). We allow 3e-3 of
the largest value plus 1e-3 (a fifth of one Adam step at the tests' learning rate); a real mistake (a shard's loss weighted wrongly, unsynchronised BatchNorm, a
dropout mask drawn per process) moves weights by far more and changes the losses at the third decimal. On an
AVX-512 VNNI machine without AMX, 25 of the 25,344 weights of the fusion's first layer ended up to 4.2e-3 apart
(nearly one Adam step at the tests' 5e-3), every other weight of the model within 1.1e-3: so a weight may also
be one Adam step further off, as long as at most 1 % of its tensor is beyond the tolerance.

Some set-ups amplify those last bits much more. With modalities missing, one process with one thread and the
same process with two threads (which also only reorders sums) end two epochs up to 8.9e-3 apart on a fusion
weight (7.6 % of its largest value after one epoch with modality dropout too), and two processes are as close
to either. Missing modalities are therefore compared on the losses only, without modality dropout; the test
metrics of a barely trained model flip on near-ties there too. Metrics and weights are compared on the
built-in set, as the issue's target asks.

The default options on the full built-in set magnify float32 rounding far more still in their first epochs
(one process with one thread and with two end 3 epochs 9 validation points apart), so that run is compared in
float64, where one process and two must agree to the last digits (tests/float64_training.py).
"""

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from polysense.cli.main import main  # noqa: E402
from polysense.machine import machine  # noqa: E402
from polysense.models.training.distributed.sharding import pieces  # noqa: E402
from polysense.models.training.options import TrainOptions  # noqa: E402

pytestmark = pytest.mark.slow  # trains, in several processes

SMALL = ["--image-width", "8", "--embed-dim", "32", "--batch-size", "32", "--patience", "0", "--lr", "5e-3"]
ADAM_STEP = float(SMALL[SMALL.index("--lr") + 1])  # how far one Adam step moves a weight at most
WEIGHT_TOLERANCE = 3e-3  # of each tensor's largest magnitude (module docstring)
STEP_TOLERANCE = ADAM_STEP / 5  # absolute, for tensors of small values
OUTLIER_SHARE = 0.01  # of a tensor's weights that may be beyond the tolerance, by at most one Adam step
# On an AMD EPYC with AVX2 only, one process and two ended with identical metrics but test losses 0.15 % apart,
# validation losses 0.22 %, and a fusion weight 4.5 Adam steps apart: the last bits drift further there. The
# weight bounds above were measured on AVX-512 machines and are checked only on them; losses within 0.5 %.
CHECK_WEIGHTS = "avx512f" in machine()["isa"]
LOSS_TOLERANCE = 1e-3 if CHECK_WEIGHTS else 5e-3


@pytest.fixture(scope="module")
def partial_manifest(tiny_builtin, tmp_path_factory) -> Path:
    """The tiny built-in set with some images and some audio missing, so batches have modalities absent."""
    folder = tiny_builtin.parent
    rows = list(csv.DictReader(tiny_builtin.open()))
    for index, row in enumerate(rows):
        for key in ("image", "audio"):
            row[key] = str(folder / row[key])
        if index % 5 == 1:
            row["image"] = ""
        if index % 7 == 3:
            row["audio"] = ""
    path = tmp_path_factory.mktemp("partial") / "manifest.csv"
    with path.open("w", newline="") as out:
        writer = csv.DictWriter(out, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def _run(argv: list[str]) -> None:
    assert main(["train", *argv]) == 0


@pytest.fixture(scope="module")
def one_process(tiny_builtin, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("one") / "run"
    _run(_flags(tiny_builtin, out, 3))
    return out


def _flags(manifest: Path, out: Path, epochs: int, *extra: str) -> list[str]:
    """Flags of a small run; on the partial set without modality dropout (module docstring)."""
    dropout = ["--modality-dropout", "0"] if manifest.parent.name.startswith("partial") else []
    return [
        *("--data", str(manifest), "--out", str(out), "--epochs", str(epochs), "--no-progress"),
        *SMALL,
        *dropout,
        *extra,
    ]


def _assert_same_run(a: Path, b: Path, same_metrics: bool = True, same_weights: bool = True) -> None:
    metrics_a, metrics_b = (json.loads((run / "metrics.json").read_text()) for run in (a, b))
    history_a, history_b = metrics_a.pop("history"), metrics_b.pop("history")
    assert metrics_a.pop("loss") == pytest.approx(metrics_b.pop("loss"), rel=LOSS_TOLERANCE)
    if same_metrics:
        subsets_a, subsets_b = metrics_a.pop("subsets"), metrics_b.pop("subsets")
        assert metrics_a == metrics_b  # accuracy, precision, recall, F1 and confusion with every modality
        # The built-in label combines all three modalities, so with one missing the prediction is a near-tie
        # that the last float bits decide (one process with 1 or 2 threads: up to 5 of 300 samples apart).
        for name, subset in subsets_a.items():
            assert abs(subset["accuracy"] - subsets_b[name]["accuracy"]) * subset["count"] <= 2, name
    assert [h["epoch"] for h in history_a] == [h["epoch"] for h in history_b]
    with (a / "manifest.csv").open(newline="") as handle:
        val_rows = sum(row["split"] == "val" for row in csv.DictReader(handle))
    for one, other in zip(history_a, history_b):
        for key in ("train_loss", "val_loss"):
            assert one[key] == pytest.approx(other[key], rel=LOSS_TOLERANCE), (one["epoch"], key)
        # Near-ties again: a run resumed in one process after two ended epoch 2 one validation sample apart
        # on an AVX-512 VNNI machine without AMX (its losses within 1e-3).
        apart = abs(one["val_accuracy"] - other["val_accuracy"]) * val_rows
        assert apart <= 2 + 1e-9, (one["epoch"], "val_accuracy")
    if not (same_weights and CHECK_WEIGHTS):
        return
    weights_a, weights_b = (torch.load(run / "model.pt", weights_only=True)["model"] for run in (a, b))
    assert weights_a.keys() == weights_b.keys()
    for name, value in weights_a.items():
        # BatchNorm's running statistics are re-estimated from the weights through several layers; their
        # effect is in the losses and metrics compared above.
        if value.is_floating_point() and "running_" not in name:
            allowed = WEIGHT_TOLERANCE * float(value.abs().max()) + STEP_TOLERANCE
            apart = (value - weights_b[name]).abs()
            assert float(apart.max()) <= allowed + ADAM_STEP, name
            assert float((apart > allowed).float().mean()) <= OUTLIER_SHARE, name


def test_two_processes_repeat_one_process(one_process, tiny_builtin, tmp_path):
    _run(_flags(tiny_builtin, tmp_path / "two", 3, "--nproc", "2"))
    _assert_same_run(one_process, tmp_path / "two")
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == sorted(
        p.name for p in one_process.iterdir()
    )


def _train_in_float64(manifest: Path, out: Path, processes: int) -> subprocess.Popen:
    """Start `polysense train` with the default options for 3 epochs, in float64 (tests/float64_training.py),
    in `processes` processes of one thread each."""
    script = Path(__file__).with_name("float64_training.py")
    launcher = [sys.executable]
    if processes > 1:  # torchrun, as --nproc starts it
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}"]
    flags = ["--data", str(manifest), "--out", str(out), "--epochs", "3", "--no-progress"]
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    # Its output to a file, not a pipe: two runs at once never wait for a pipe to be read.
    with out.with_name(f"{out.name}.log").open("w") as log:
        command = [*launcher, str(script), *flags]
        return subprocess.Popen(command, env=environment, stdout=log, stderr=subprocess.STDOUT)


def test_two_processes_repeat_one_with_default_options_on_the_full_built_in_set(tmp_path):
    """Default options, the full built-in set (3,000 samples), 3 epochs: the run the issue compared. In float32
    its first epochs amplify rounding so much that one process with one thread and with two end 3 epochs 9
    validation points apart (tests/float64_training.py), so the runs are compared in float64, where one
    process and two must agree to the last digits: every loss to 1e-9, every accuracy and metric exactly."""
    from polysense.datasets.builtin import write_builtin

    manifest = write_builtin(tmp_path / "data", progress=False)
    started = {n: _train_in_float64(manifest, tmp_path / f"run{n}", n) for n in (1, 2)}  # side by side
    for processes, process in started.items():
        log = tmp_path / f"run{processes}.log"
        assert process.wait(timeout=1200) == 0, (processes, log.read_text()[-3000:])
    one, two = (json.loads((tmp_path / f"run{n}" / "metrics.json").read_text()) for n in (1, 2))
    history_one, history_two = one.pop("history"), two.pop("history")
    assert len(history_one) == len(history_two) == 3
    for a, b in zip(history_one, history_two):
        for key in ("train_loss", "val_loss"):
            assert a.pop(key) == pytest.approx(b.pop(key), rel=1e-9), (a["epoch"], key)
        assert a == b  # validation accuracy and score
    assert one.pop("loss") == pytest.approx(two.pop("loss"), rel=1e-9)
    assert one == two  # test accuracy, precision, recall, F1, confusion, every subset


def test_two_processes_repeat_one_with_modalities_missing(partial_manifest, tmp_path):
    """Batches where a shard lacks a modality the other has: losses over whole-batch counts, unused
    parameters."""
    _run(_flags(partial_manifest, tmp_path / "one", 2))
    _run(_flags(partial_manifest, tmp_path / "two", 2, "--nproc", "2"))
    _assert_same_run(tmp_path / "one", tmp_path / "two", same_metrics=False, same_weights=False)


def test_alternating_with_accumulation_repeats_one_process(tiny_builtin, tmp_path):
    """Micro-batches, modality dropout, augmentation and the alternating strategy (parameters without a
    gradient on every other step)."""
    extra = ("--strategy", "alternating", "--fusion", "reliability", "--accumulate", "2")
    _run(_flags(tiny_builtin, tmp_path / "one", 2, *extra))
    _run(_flags(tiny_builtin, tmp_path / "two", 2, *extra, "--nproc", "2"))
    _assert_same_run(tmp_path / "one", tmp_path / "two")


def test_an_interrupted_run_of_one_process_resumes_with_two(one_process, tiny_builtin, tmp_path, monkeypatch):
    from polysense.models.training import run_folder

    save_checkpoint = run_folder.save_checkpoint

    def interrupt_after_the_first_epoch(run_dir, checkpoint):
        save_checkpoint(run_dir, checkpoint)
        raise KeyboardInterrupt

    monkeypatch.setattr(run_folder, "save_checkpoint", interrupt_after_the_first_epoch)
    out = tmp_path / "run"
    assert main(["train", *_flags(tiny_builtin, out, 3)]) == 130  # as Ctrl-C would
    monkeypatch.undo()
    assert [p.name for p in (out / "checkpoints").glob("epoch_*.pt")] == ["epoch_001.pt"]
    _run([*_flags(tiny_builtin, out, 3), "--resume", "--nproc", "2"])
    _assert_same_run(one_process, out)


def test_staged_training_on_generated_built_in_data_in_two_processes(tmp_path, capfd):
    """Rank 0 generates the built-in set in the run folder and the other process reads it; each phase of
    --strategy staged (after a solo epoch, whose fusion waits) wraps its own parameters; --quiet reaches the
    processes."""
    out = tmp_path / "run"
    flags = ["--data", "builtin", "--n", "120", "--out", str(out), "--no-progress", *SMALL]
    staged = ["--strategy", "staged", "--solo-epochs", "1", "--pretrain-epochs", "1", "--epochs", "1"]
    assert main(["--quiet", "train", *flags, *staged, "--nproc", "2"]) == 0
    assert "epoch 1/3" not in capfd.readouterr().err
    history = json.loads((out / "metrics.json").read_text())["history"]
    assert [h["phase"] for h in history] == ["solo", "pretrain", "fusion"]
    assert (out / "builtin_data" / "manifest.csv").is_file() and (out / "model.pt").is_file()


def test_a_shard_without_a_modality_the_batch_has_keeps_the_processes_in_step(tiny_builtin, tmp_path):
    """Images on one sample in ten and shards of 4: most steps give one process no image at all. The encoder
    and its head must still run there, or that process skips a synchronised BatchNorm's backward all_reduce
    and the processes deadlock (staged pre-training and alternating compute per-modality losses)."""
    folder = tiny_builtin.parent
    rows = list(csv.DictReader(tiny_builtin.open()))
    for index, row in enumerate(rows):
        row["image"] = str(folder / row["image"]) if index % 10 == 0 else ""
        row["audio"] = str(folder / row["audio"])
    manifest = tmp_path / "rare_images.csv"
    with manifest.open("w", newline="") as out:
        writer = csv.DictWriter(out, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    out = tmp_path / "run"
    flags = _flags(manifest, out, 1, "--strategy", "staged", "--pretrain-epochs", "1", "--batch-size", "8")
    command = [sys.executable, "-m", "polysense", "train", *flags, "--nproc", "2"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (out / "metrics.json").is_file()


def _rank_process(out: Path, rank: int, timeout: float = 60) -> int:
    """The pid of the training process of `rank` whose command line names `out`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for entry in Path("/proc").iterdir():
            try:
                command = (entry / "cmdline").read_bytes().split(b"\0")
                environment = (entry / "environ").read_bytes().split(b"\0")
            except (OSError, ValueError):
                continue
            if str(out).encode() in command and f"RANK={rank}".encode() in environment:
                return int(entry.name)
        time.sleep(0.05)
    raise AssertionError(f"no rank {rank} process for {out}")


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds the processes through /proc")
def test_a_killed_process_fails_the_run_cleanly_and_resume_continues_it_with_one(
    one_process, tiny_builtin, tmp_path
):
    out = tmp_path / "run"
    command = [sys.executable, "-m", "polysense", "train", *_flags(tiny_builtin, out, 3), "--nproc", "2"]
    launcher = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    victim = _rank_process(out, rank=1)
    first_checkpoint = out / "checkpoints" / "epoch_001.pt"
    deadline = time.monotonic() + 120
    while not first_checkpoint.exists() and time.monotonic() < deadline and launcher.poll() is None:
        time.sleep(0.02)
    os.kill(victim, signal.SIGKILL)  # in the middle of the second epoch
    _, stderr = launcher.communicate(timeout=120)

    assert launcher.returncode == 2
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "training process 1 of 2 failed" in errors[0] and "--resume" in errors[0]
    assert "Traceback" not in stderr
    assert "process 0 of 2: stopped, another process of the run failed" in stderr
    assert not (out / "metrics.json").exists()
    _run([*_flags(tiny_builtin, out, 3), "--resume"])  # one process now
    _assert_same_run(one_process, out)


def test_launch_mistakes_give_one_error_line_before_any_process_starts(partial_manifest, tmp_path, capsys):
    cases = [
        (["--nproc", "0"], "--nproc must be at least 1"),
        (["--nproc", "2", "--batch-size", "1"], "--batch-size 1 cannot be split"),
        (["--nproc", "2", "--batch-size", "4", "--accumulate", "3"], "use --batch-size 6 or more"),
        (["--accumulate", "0"], "--accumulate must be at least 1"),
    ]
    for extra, message in cases:
        assert main(["train", *_flags(partial_manifest, tmp_path / "run", 1), *extra]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
    assert main(["train", "--out", str(tmp_path / "none"), "--data", "x", "--resume", "--nproc", "2"]) == 2
    assert "holds no run" in capsys.readouterr().err


def test_torchrun_s_process_count_wins_over_a_different_nproc(
    partial_manifest, tmp_path, monkeypatch, capsys
):
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert main(["train", *_flags(partial_manifest, tmp_path / "run", 1), "--nproc", "2"]) == 2
    assert "differs from torchrun's 4 processes" in capsys.readouterr().err


def test_batches_split_into_contiguous_shards_of_every_micro_batch():
    batch = list(range(100, 110))
    mine = [pieces(batch, processes=2, rank=r, accumulate=2) for r in (0, 1)]
    assert [p.indices for p in mine[0]] == [[100, 101, 102], [105, 106, 107]]
    assert [p.indices for p in mine[1]] == [[103, 104], [108, 109]]
    assert [p.first_row for p in mine[1]] == [3, 3]
    assert mine[0][1].micro_batch == list(range(105, 110))
    # A last batch too small for every process to get a row of every micro-batch: fewer micro-batches, or none.
    assert [p.indices for p in pieces([1, 2, 3], 2, 1, 2)] == [[3]]
    assert pieces([7], 2, 0, 1) == [] and pieces([7], 2, 1, 1) == []


def test_synced_batchnorm_in_one_process_equals_torch_s(tmp_path):
    """The statistics, the output, the gradient and the running averages (momentum and cumulative)."""
    import torch.distributed as dist

    from polysense.models.training.distributed.sharded_layers import StepContext, SyncedBatchNorm

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        for momentum in (0.1, None):
            reference = torch.nn.BatchNorm2d(5, momentum=momentum)
            torch.nn.init.uniform_(reference.weight)
            synced = SyncedBatchNorm(reference, StepContext(active=True, synchronise=True))
            x = torch.randn(6, 5, 4, 3) * 3 + 1
            for _ in range(2):
                a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
                out_reference, out_synced = reference(a), synced(b)
                torch.testing.assert_close(out_synced, out_reference, rtol=1e-5, atol=1e-5)
                (out_reference * x).sum().backward()
                (out_synced * x).sum().backward()
                torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(synced.weight.grad, reference.weight.grad, rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(synced.bias.grad, reference.bias.grad, rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(synced.running_mean, reference.running_mean)
            torch.testing.assert_close(synced.running_var, reference.running_var)
            assert synced.state_dict().keys() == reference.state_dict().keys()
    finally:
        dist.destroy_process_group()


def test_the_audio_window_s_trailing_silence_is_drawn_per_row_as_one_process_draws_it():
    """The audio efficientnet-lite0 family follows each training recording with random silence, drawn from
    torch's global generator. Each process drew its own rows' numbers from the same state, so every shard got
    the first shard's draws; now the shards of a batch draw what one process draws for the whole batch, and one
    process draws exactly what it drew before."""
    from polysense.models.encoders.audio_window import WindowedSpectrogramEncoder
    from polysense.models.training.distributed.sharded_layers import StepContext, shard_layers

    encoder = WindowedSpectrogramEncoder(n_mels=8, embed_dim=4).train()
    encoder._embed = lambda window: window  # the window itself shows where each recording ends
    frames = torch.randn(4, 30, 8)
    mask = (torch.arange(30) < torch.tensor([[5], [10], [20], [30]])).float()

    def windows(rows: slice, first_row: int) -> torch.Tensor:
        torch.manual_seed(7)  # as every process seeds the epoch alike
        context.start(first_row, 4, seed=0)
        try:
            return encoder(frames[rows], mask[rows])
        finally:
            context.stop()

    context = StepContext()
    before = windows(slice(0, 4), 0)  # one process, before shard_layers: torch.rand(4)
    shard_layers(encoder, context)
    assert torch.equal(windows(slice(0, 4), 0), before)
    assert torch.equal(torch.cat([windows(slice(0, 2), 0), windows(slice(2, 4), 2)]), before)


def test_options_record_accumulation_and_a_resumed_run_may_change_it():
    from polysense.models.training.run_folder import RESUME_MAY_CHANGE

    assert TrainOptions(data="x", out="y").accumulate == 1
    assert "accumulate" in RESUME_MAY_CHANGE
