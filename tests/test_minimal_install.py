"""Per-modality dependencies: a runtime serving an image-only bundle needs neither soundfile, soxr nor tokenizers,
and the extras say so; a bundle whose modality lacks its package names the extra to install."""

import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

pytest.importorskip("onnxruntime")

ROOT = Path(__file__).resolve().parents[1]
MODALITY_PACKAGES = {
    "image": {"opencv-python-headless"},
    "audio": {"soundfile", "soxr"},
    "text": {"tokenizers"},
}


def _names(requirements):
    return {r.split(">")[0].split("=")[0].split("[")[0].strip() for r in requirements}


def test_the_extras_split_the_runtime_by_modality():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    every_modality_package = set().union(*MODALITY_PACKAGES.values())
    assert not _names(project["dependencies"]) & every_modality_package  # the base install has none
    extras = project["optional-dependencies"]
    for modality, packages in MODALITY_PACKAGES.items():
        assert _names(extras[modality]) == packages
    assert _names(extras["ort"]) == {"onnxruntime"}
    assert "polysense[ort,image,audio,text]" in extras["cpu"]  # polysense[cpu] stays the whole runtime


@pytest.fixture(scope="module")
def image_bundle(tiny_builtin, tmp_path_factory):
    """A tiny image-only bundle (trained one epoch: what it predicts does not matter here)."""
    pytest.importorskip("torch")
    from polysense.export import export_run
    from polysense.models.training.options import TrainOptions
    from polysense.models.training.train import train

    run = tmp_path_factory.mktemp("image_run") / "run"
    options = TrainOptions(
        data=str(tiny_builtin), out=str(run), modalities=("image",), epochs=1, image_width=8, embed_dim=16,
        batch_size=64, progress=False, patience=0,
    )  # fmt: skip
    train(options)
    return export_run(run, run.parent / "bundle", progress=False, policy=None).bundle


BLOCKED = """
import sys
for name in ("soundfile", "soxr", "tokenizers", "torch", "onnx"):
    sys.modules[name] = None  # as if not installed: importing any of them raises ImportError
import polysense
"""


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", BLOCKED + code], capture_output=True, text=True, timeout=120)


@pytest.mark.slow
def test_an_image_only_bundle_is_served_without_audio_or_text_packages(image_bundle, sign_photo):
    result = _run(
        f"pipe = polysense.Pipeline.load({str(image_bundle)!r}, device='cpu')\n"
        f"print(pipe.predict(image={str(sign_photo)!r}).label in pipe.labels)\n"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "True"


def test_a_modality_without_its_package_names_the_extra(bundle):
    result = _run(
        "try:\n"
        f"    polysense.Pipeline.load({str(bundle)!r}, device='cpu')\n"
        "except polysense.DependencyError as error:\n"
        "    print(error)\n"
    )
    assert result.returncode == 0, result.stderr
    assert "pip install 'polysense[text]'" in result.stdout
