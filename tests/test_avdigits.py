import csv
from collections import Counter
from pathlib import Path

import pytest
from conftest import SHARED_DATA, _require

from polysense.datasets.avdigits import AVDigitsSpec, build_rows, write_avdigits
from polysense.errors import InputError

pytestmark = pytest.mark.slow  # reads the AV-digits data in ../shared/data


@pytest.fixture(scope="module")
def sources():
    return str(_require(SHARED_DATA / "fsdd")), str(_require(SHARED_DATA / "sign_digits"))


def _speaker(path):
    return Path(path).name.split("_")[1]


def test_splits_are_disjoint_deterministic_and_follow_fsdd(sources):
    fsdd, images = sources
    rows = build_rows(AVDigitsSpec(fsdd, images, seed=1))
    assert rows == build_rows(AVDigitsSpec(fsdd, images, seed=1))
    assert rows != build_rows(AVDigitsSpec(fsdd, images, seed=2))
    assert len(rows) == 2500 and len({r["audio"] for r in rows}) == 2500
    for row in rows:
        index = int(Path(row["audio"]).stem.split("_")[2])
        assert (row["split"] == "test") == (index < 5)
        assert Path(row["image"]).parent.name == row["label"] == Path(row["audio"]).name[0]  # paired by label
    images_by_split = {s: {r["image"] for r in rows if r["split"] == s} for s in ("train", "val", "test")}
    assert not images_by_split["train"] & images_by_split["val"]
    assert not images_by_split["train"] & images_by_split["test"]
    assert not images_by_split["val"] & images_by_split["test"]
    counts = Counter(r["split"] for r in rows)
    assert counts["test"] == 250 and counts["val"] > 100


def test_holdout_speaker_is_never_heard_in_training(sources, tmp_path):
    fsdd, images = sources
    manifest = write_avdigits(AVDigitsSpec(fsdd, images, seed=0, holdout_speaker="theo"), tmp_path)
    rows = list(csv.DictReader(manifest.open()))
    speakers = {s: {_speaker(r["audio"]) for r in rows if r["split"] == s} for s in ("train", "val", "test")}
    assert speakers["test"] == {"theo"}
    assert "theo" not in speakers["train"] | speakers["val"]
    assert (tmp_path / rows[0]["audio"]).resolve().is_file()  # relative to the manifest, not copied
    with pytest.raises(InputError, match="speakers are george"):
        build_rows(AVDigitsSpec(fsdd, images, holdout_speaker="nobody"))


def test_small_end_to_end_run_on_real_data(sources, tmp_path):
    """A CI-sized AV-digits run: 8 kHz audio resampled on the way in, real photos, train -> export -> eval."""
    pytest.importorskip("torch")
    import polysense
    from polysense.export import export_run
    from polysense.models.training.options import TrainOptions
    from polysense.models.training.train import train
    from polysense.tools.evaluate import evaluate_bundle

    fsdd, images = sources
    rows = build_rows(AVDigitsSpec(fsdd, images, seed=0))
    small = [r for i, r in enumerate(rows) if i % 8 == 0]  # every split keeps a share
    manifest = tmp_path / "small.csv"
    with manifest.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["image", "audio", "label", "split", "speaker"])
        writer.writeheader()
        writer.writerows(small)
    result = train(
        TrainOptions(
            data=str(manifest),
            out=str(tmp_path / "run"),
            epochs=2,
            image_width=8,
            embed_dim=32,
            progress=False,
        )
    )
    assert set(result.metrics["subsets"]) == {"image", "audio", "image+audio"}
    bundle = export_run(tmp_path / "run", tmp_path / "bundle", progress=False, policy=None).bundle
    pipeline = polysense.Pipeline.load(bundle, device="cpu")
    metrics = evaluate_bundle(pipeline, tmp_path / "run" / "manifest.csv", "test", progress=False)
    assert metrics["accuracy"] == pytest.approx(result.metrics["accuracy"])
    assert pipeline.description.preprocessing.audio.sample_rate == 16000


def test_exif_rotated_photo_is_upright(sources, tmp_path):
    """A real sign photo, re-saved with EXIF orientation 6, decodes to the upright photo rotated back."""
    import numpy as np
    from test_image import _jpeg_with_orientation

    from polysense.preprocess.image import decode_image

    photo = sorted(Path(sources[1]).glob("3/*.JPG"))[0]
    upright = decode_image(photo)
    stored = np.ascontiguousarray(np.rot90(upright, k=1))  # as a sideways-held camera would store it
    decoded = decode_image(_jpeg_with_orientation(stored, 6))
    assert decoded.shape == upright.shape
    assert np.abs(decoded.astype(int) - upright.astype(int)).mean() < 4
