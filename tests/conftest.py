import os
from pathlib import Path

import pytest

# Before anything imports onnxruntime: polysense switches its telemetry off (polysense.privacy), so the suite
# writes nothing into ~/.cache either.
import polysense  # noqa: F401

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def _require(path: Path) -> Path:
    if not path.exists():
        if os.environ.get("POLYSENSE_REQUIRE_DATA") == "1":
            pytest.fail(f"{path} is missing and POLYSENSE_REQUIRE_DATA=1 (CI needs ../shared/data)")
        pytest.skip(f"{path} is missing: real-data tests need ../shared/data beside the repository")
    return path


@pytest.fixture(scope="session")
def fsdd_file() -> Path:
    """A real 8 kHz FSDD recording (2.2 s, one of the longest)."""
    return _require(SHARED_DATA / "fsdd" / "recordings" / "7_theo_36.wav")


@pytest.fixture(scope="session")
def sign_photo() -> Path:
    """A real phone-camera JPEG with EXIF."""
    folder = _require(SHARED_DATA / "sign_digits" / "4")
    return sorted(folder.glob("*.JPG"))[0]


@pytest.fixture(scope="session")
def tiny_builtin(tmp_path_factory) -> Path:
    """A small built-in dataset (manifest path), written once per test session."""
    from polysense.datasets.builtin import BuiltinSpec, write_builtin

    return write_builtin(
        tmp_path_factory.mktemp("builtin") / "data", BuiltinSpec(n=360, seed=3), progress=False
    )


@pytest.fixture(scope="session")
def trained_run(tiny_builtin, tmp_path_factory) -> Path:
    """A small finished training run on the tiny built-in set (all three modalities)."""
    pytest.importorskip("torch")
    from polysense.models.training.options import TrainOptions
    from polysense.models.training.train import train

    out = tmp_path_factory.mktemp("run") / "run"
    options = TrainOptions(
        data=str(tiny_builtin),
        out=str(out),
        epochs=3,
        image_width=8,
        embed_dim=32,
        batch_size=32,
        progress=False,
        patience=0,
        lr=5e-3,
    )
    train(options)
    return out


@pytest.fixture(scope="session")
def other_bundle(tiny_builtin, tmp_path_factory) -> Path:
    """A second model of the tiny built-in set (another seed, fewer epochs, exported without variants): a member
    of an ensemble that errs differently from the session's bundle."""
    pytest.importorskip("torch")
    from polysense.export import export_run
    from polysense.models.training.options import TrainOptions
    from polysense.models.training.train import train

    out = tmp_path_factory.mktemp("other")
    settings = dict(epochs=2, image_width=8, embed_dim=32, batch_size=32, progress=False, patience=0)
    train(TrainOptions(data=str(tiny_builtin), out=str(out / "run"), seed=1, lr=5e-3, **settings))
    return export_run(out / "run", out / "bundle", progress=False, policy=None).bundle


@pytest.fixture(scope="session")
def pipe(bundle):
    """The session's bundle at fp32 on CPU, one Pipeline for every test that wants it (a Pipeline may be shared).
    fp32: these tests compare paths exactly, and dynamic int8 quantizes activations per batch, so an int8
    component's output for a sample shifts slightly with its batch mates. A module may define its own `pipe`."""

    return polysense.Pipeline.load(bundle, device="cpu", precision="fp32")


@pytest.fixture(scope="session")
def test_rows(trained_run) -> list:
    """The test-split rows of the trained run's manifest."""
    from polysense.tools.manifest import read_manifest

    return [r for r in read_manifest(trained_run / "manifest.csv").rows if r.split == "test"]


@pytest.fixture
def copied_bundle(bundle, tmp_path) -> Path:
    """A copy of the session's bundle that a test may alter."""
    import shutil

    folder = tmp_path / "bundle"
    shutil.copytree(bundle, folder)
    return folder


@pytest.fixture(scope="session")
def bundle(trained_run, tmp_path_factory) -> Path:
    """The trained run exported to a bundle."""
    from polysense.export import export_run
    from polysense.export.variants import VariantPolicy

    # Variants are tried as in a real export, with fewer latency runs to keep the suite fast.
    policy = VariantPolicy(latency_runs=20)
    return export_run(
        trained_run, tmp_path_factory.mktemp("bundle") / "bundle", progress=False, policy=policy
    ).bundle
