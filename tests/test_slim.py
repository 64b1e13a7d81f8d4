"""`polysense bundle slim` removes the variants a device never uses; the bundle still loads and predicts."""

import json

import numpy as np
import pytest

pytest.importorskip("onnxruntime")

import polysense  # noqa: E402
from polysense.bundle.schema import DESCRIPTION_FILE  # noqa: E402
from polysense.cli.main import main  # noqa: E402


def _devices(folder):
    description = json.loads((folder / DESCRIPTION_FILE).read_text())
    return {
        (name, precision): variant["device"]
        for name, component in description["components"].items()
        for precision, variant in component["variants"].items()
    }


@pytest.mark.parametrize(
    "keep, allowed", [("cpu", {"cpu", "any"}), ("cuda", {"cuda", "any"}), ("fp32", set())]
)
def test_slim_keeps_fp32_and_the_variants_of_the_device(bundle, copied_bundle, keep, allowed, capsys):
    before = _devices(copied_bundle)
    assert main(["bundle", "slim", str(copied_bundle), "--keep", keep]) == 0
    assert "removed" in capsys.readouterr().out
    after = _devices(copied_bundle)
    expected = {k: d for k, d in before.items() if k[1] == "fp32" or d in allowed}
    assert after == expected
    on_disk = {p.name for p in copied_bundle.iterdir()}
    assert not any(name.endswith(".tmp") for name in on_disk)
    assert len([n for n in on_disk if n.endswith(".onnx")]) == len(after)
    sample = {"text": "a calm morning", "audio": np.zeros(8000, np.float32), "sample_rate": 16000}
    slimmed = polysense.Pipeline.load(copied_bundle, device="cpu", precision="fp32").predict(**sample)
    original = polysense.Pipeline.load(bundle, device="cpu", precision="fp32").predict(**sample)
    assert slimmed.probabilities == original.probabilities


def test_slim_refuses_a_damaged_bundle_and_unknown_targets(copied_bundle, capsys):
    fusion = copied_bundle / "fusion.fp32.onnx"
    fusion.write_bytes(fusion.read_bytes()[:-1] + b"\x00")
    assert main(["bundle", "slim", str(copied_bundle), "--keep", "cpu"]) == 2
    assert capsys.readouterr().err.startswith("error:") and len(_devices(copied_bundle)) > 4
    with pytest.raises(SystemExit) as exit_info:
        main(["bundle", "slim", str(copied_bundle), "--keep", "tpu"])
    assert exit_info.value.code == 2
