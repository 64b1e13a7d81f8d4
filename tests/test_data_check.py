"""`polysense data check` and the check `polysense train` runs: on tiny generated manifests with planted problems
(exact and near duplicate images, re-encoded and clipped and silent audio, normalised-text duplicates, leaked
rows, unreadable and missing files, flipped labels) that the check must find, and on the real datasets."""

import csv
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import SHARED_DATA, _require

from polysense.cli.main import main
from polysense.errors import ConfigError, DependencyError, InputError
from polysense.tools.data_check import CheckOptions, check_manifest, format_report, label_errors, quick_check
from polysense.tools.data_check.html import write_html
from polysense.tools.manifest import read_manifest

cv2 = pytest.importorskip("cv2")
soundfile = pytest.importorskip("soundfile")
RATE = 16_000


def _image(rng: np.random.Generator) -> np.ndarray:
    """A 64 x 64 picture of a few random rectangles: different pictures share nothing."""
    image = np.full((64, 64, 3), rng.integers(0, 255, 3), np.uint8)
    for _ in range(4):
        x, y = rng.integers(0, 48, 2)
        image[y : y + rng.integers(8, 16), x : x + rng.integers(8, 16)] = rng.integers(0, 255, 3)
    return image


def _tone(rng: np.random.Generator, seconds: float = 0.3) -> np.ndarray:
    t = np.arange(int(seconds * RATE)) / RATE
    start, end = rng.uniform(200, 2000, 2)
    phase = 2 * np.pi * np.cumsum(np.linspace(start, end, t.size)) / RATE
    return (0.4 * np.sin(phase) * np.minimum(1, np.minimum(t, t[-1] - t) / 0.02)).astype(np.float32)


def _write(folder: Path, rows: list[dict]) -> Path:
    manifest = folder / "manifest.csv"
    with manifest.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, ["image", "text", "audio", "label", "split"])
        writer.writeheader()
        writer.writerows(rows)
    return manifest


@pytest.fixture(scope="module")
def planted(tmp_path_factory) -> Path:
    """12 clean rows (lines 2-13), then one planted problem a row (lines 14-22)."""
    folder = tmp_path_factory.mktemp("planted")
    rng = np.random.default_rng(0)
    rows = []
    for i in range(12):
        cv2.imwrite(str(folder / f"i{i}.png"), _image(rng)[:, :, ::-1])
        soundfile.write(folder / f"a{i}.wav", _tone(rng), RATE, subtype="PCM_16")
        split = ("train", "train", "val", "test")[i % 4]
        rows.append(
            {
                "image": f"i{i}.png",
                "text": f"sample {i} of kind {'ab'[i % 2]}",
                "audio": f"a{i}.wav",
                "label": "ab"[i % 2],
                "split": split,
            }
        )
    (folder / "copy.png").write_bytes((folder / "i0.png").read_bytes())  # the same bytes, another name
    ok, jpeg = cv2.imencode(".jpg", cv2.imread(str(folder / "i1.png")), [cv2.IMWRITE_JPEG_QUALITY, 60])
    (folder / "reencoded.jpg").write_bytes(jpeg.tobytes())
    samples, _ = soundfile.read(folder / "a1.wav", dtype="float32")
    padded = np.concatenate([np.zeros(800, np.float32), 0.5 * samples, np.zeros(400, np.float32)])
    soundfile.write(folder / "quieter.flac", padded, RATE)  # the same recording: gain, silence, FLAC
    soundfile.write(folder / "clipped.wav", np.clip(3 * _tone(rng), -1, 1), RATE, subtype="PCM_16")
    soundfile.write(folder / "silent.wav", np.zeros(RATE // 4, np.float32), RATE, subtype="PCM_16")
    soundfile.write(folder / "odd.wav", _tone(rng), 12_345, subtype="PCM_16")
    (folder / "broken.wav").write_bytes(b"RIFF\x10\x00\x00\x00WAVEfmt garbage")
    rows += [
        {"image": "copy.png", "label": "a", "split": "train"},  # 14: exact image duplicate of line 2
        {"image": "reencoded.jpg", "label": "b", "split": "train"},  # 15: near duplicate of line 3
        {"audio": "quieter.flac", "label": "b", "split": "train"},  # 16: near duplicate of line 3's audio
        {"text": "Sample 5, of KIND b!", "label": "b", "split": "train"},  # 17: text line 7 normalised
        {
            "image": "i4.png",
            "text": "sample 4 of kind a",
            "audio": "a4.wav",
            "label": "a",
            "split": "test",
        },  # 18
        {"audio": "clipped.wav", "label": "a", "split": "train"},  # 19
        {"audio": "silent.wav", "label": "a", "split": "train"},  # 20
        {"audio": "broken.wav", "text": "broken audio", "label": "a", "split": "train"},  # 21: unreadable
        {
            "image": "gone.png",
            "audio": "odd.wav",
            "label": "b",
            "split": "train",
        },  # 22: missing image, odd rate
    ]
    return _write(folder, rows)


@pytest.fixture(scope="module")
def planted_report(planted):
    return check_manifest(planted, CheckOptions(label_errors=False), progress=False)


def _pairs(groups) -> set:
    return {g.lines for g in groups}


def test_duplicates_exact_and_near_are_found(planted_report):
    image, audio, text = (planted_report.modalities[m] for m in ("image", "audio", "text"))
    assert (2, 14) in _pairs(image.exact) and (3, 15) in _pairs(image.near)
    assert (3, 16) in _pairs(audio.near)
    assert (7, 17) in _pairs(text.near) and (7, 17) not in _pairs(text.exact)
    # The leaked row repeats line 6 (train) in test, every cell the same bytes or text.
    assert (6, 18) in _pairs(planted_report.samples)
    assert planted_report.leakage.test_in_train == 1 and planted_report.leakage.lines == (18,)
    # Nothing else was paired: different pictures, tones and texts are not near each other.
    assert len(image.near) == 1 and len(audio.near) == 1 and len(text.near) == 1


def test_missing_unreadable_and_audio_quality(planted_report):
    audio, image = planted_report.modalities["audio"], planted_report.modalities["image"]
    assert image.not_found == (22,) and image.missing == len(range(2, 23)) - image.present
    assert [line for line, _ in audio.unreadable] == [21] and "broken.wav: " in audio.unreadable[0][1]
    quality = planted_report.audio
    assert quality.clipped == (19,) and quality.silent == (20,) and quality.odd_rate == (22,)
    assert quality.rates == {12_345: 1, RATE: quality.recordings - 1}
    assert planted_report.balance["test"] == {"a": 1, "b": 3}
    assert not planted_report.label_issues.ran and planted_report.label_issues.note == "turned off"


def test_report_forms(planted_report, tmp_path):
    text = format_report(planted_report)
    assert "test 1 of 4 in train" in text and "clipped 1 (lines 19)" in text
    assert "1 unreadable" in planted_report.summary()
    planted_report.write_json(tmp_path / "r.json")
    loaded = json.loads((tmp_path / "r.json").read_text())
    assert loaded["leakage"]["test_in_train"] == 1 and loaded["audio"]["silent"] == [20]
    write_html(planted_report, tmp_path / "r.html")
    page = (tmp_path / "r.html").read_text()
    assert page.count("data:image/") >= 4 and len(page) < 60_000  # the two pairs' thumbnails, inlined


def test_text_length_outliers(tmp_path):
    rows = [{"text": " ".join(["word"] * (5 + i % 3)), "label": "ab"[i % 2]} for i in range(30)]
    rows += [{"text": " ".join(["long"] * 80), "label": "a"}, {"text": "?!", "label": "b"}]
    report = check_manifest(_write(tmp_path, rows), CheckOptions(label_errors=False), progress=False)
    assert report.text.length_outliers == (32, 33) and report.text.over_max_length == (32,)
    assert report.text.no_words == (33,)


def test_quick_check_refuses_test_leakage_and_much_val_leakage(planted):
    rows = [r for r in read_manifest(planted).rows if r.line != 22]  # training skips the missing file
    check = quick_check(rows)
    assert check.leakage.test_in_train == 1 and "lines 18" in check.refusal()
    assert "rows without image" in check.summary()
    # Val: a share over 1 % is refused, under it is only counted (SST-2: 3 of 692).
    from dataclasses import replace

    val = [replace(r, split="val") if r.line == 18 else r for r in rows]
    assert quick_check(val).leakage.val_in_train == 1 and quick_check(val).refusal() is not None
    many_val = val + [replace(rows[1], line=100 + i, split="val", text=f"other {i}") for i in range(120)]
    assert quick_check(many_val).refusal() is None


def test_label_errors_skipped_without_their_packages(planted, monkeypatch):
    monkeypatch.setattr(label_errors, "dependencies_missing", lambda: "cleanlab is not installed; pip ...")
    report = check_manifest(planted, CheckOptions(), progress=False)
    assert not report.label_issues.ran and "cleanlab" in report.label_issues.note

    monkeypatch.setitem(sys.modules, "cleanlab", None)  # importing it fails
    monkeypatch.setitem(sys.modules, "cleanlab.filter", None)
    with pytest.raises(DependencyError, match=r"polysense\[check\]"):
        check_manifest(planted, CheckOptions(label_errors=True), progress=False)


@pytest.mark.parametrize(
    "options", [{"near_image_bits": 257}, {"near_image_bits": -1}, {"near_audio_db": -0.5}, {"folds": 1}]
)
def test_options_refused(options):
    with pytest.raises(ConfigError):
        CheckOptions(**options)


def test_cli(planted, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(label_errors, "dependencies_missing", lambda: "scikit-learn is not installed")
    out, page = tmp_path / "r.json", tmp_path / "r.html"
    flags = [
        "--near-image-bits",
        "256",
        "--near-audio-db",
        "100",
        "--seed",
        "1",
        "--folds",
        "3",
        "--no-progress",
    ]
    assert main(["data", "check", str(planted), "--json", str(out), "--html", str(page), *flags]) == 0
    printed = capsys.readouterr().out
    assert "test 1 of 4 in train" in printed and "skipped (scikit-learn is not installed)" in printed
    report = json.loads(out.read_text())
    # Every hash within 256 bits and every grid within 100 dB: all the pictures are near, and all the recordings
    # of similar lengths.
    assert len(report["modalities"]["image"]["near"][0]["lines"]) == 15  # every readable picture
    assert len(report["modalities"]["audio"]["near"][0]["lines"]) > 2
    assert page.is_file()
    assert main(["data", "check", str(planted), "--no-label-errors", "--no-progress"]) == 0
    assert "skipped (turned off)" in capsys.readouterr().out


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--folds", "1"], "folds must be at least 2"),
        (["--near-image-bits", "300"], "near_image_bits must be 0 to 256"),
        (["--near-audio-db", "-1"], "near_audio_db must be 0 or more"),
    ],
)
def test_cli_bad_values(planted, flags, message, capsys):
    assert main(["data", "check", str(planted), "--no-progress", *flags]) == 2
    assert message in capsys.readouterr().err


def test_cli_refusals(tmp_path, capsys):
    assert main(["data", "check", str(tmp_path / "none.csv")]) == 2
    assert "manifest not found" in capsys.readouterr().err
    (tmp_path / "bad.csv").write_text("imagee,label\nx.png,a\n")
    assert main(["data", "check", str(tmp_path / "bad.csv")]) == 2
    assert "unknown column 'imagee'" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # argparse: one or the other
        main(["data", "check", str(tmp_path / "bad.csv"), "--label-errors", "--no-label-errors"])
    with pytest.raises(SystemExit):
        main(["data", "check"])


def test_unreadable_never_raises(tmp_path):
    (tmp_path / "x.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    (tmp_path / "y.wav").write_bytes(b"")
    rows = [{"image": "x.png", "label": "a"}, {"audio": "y.wav", "label": "b"}]
    report = check_manifest(_write(tmp_path, rows), CheckOptions(label_errors=False), progress=False)
    assert len(report.modalities["image"].unreadable) == 1 and len(report.modalities["audio"].unreadable) == 1
    with pytest.raises(InputError):
        check_manifest(tmp_path / "missing.csv")


@pytest.mark.slow  # scikit-learn and cleanlab take seconds to import
def test_label_errors_find_flipped_labels(tmp_path):
    pytest.importorskip("sklearn")
    pytest.importorskip("cleanlab")
    rng = np.random.default_rng(0)
    words = {"a": "red apple sweet ripe fruit tree", "b": "cold blue ocean wave deep salt"}
    rows = []
    for i in range(120):
        label = "ab"[i % 2]
        text = " ".join(rng.choice(words[label].split(), 4)) + f" {rng.choice(['the', 'a', 'one'])}"
        rows.append({"text": text, "label": label})
    flipped = [10, 31, 52, 77, 96]
    for i in flipped:
        rows[i]["label"] = "b" if rows[i]["label"] == "a" else "a"
    report = check_manifest(_write(tmp_path, rows), CheckOptions(label_errors=True), progress=False)
    found = {issue.line for issue in report.label_issues.issues}
    assert {i + 2 for i in flipped} <= found and len(found) <= len(flipped) + 2
    assert report.label_issues.folds == 5 and report.label_issues.cv_accuracy > 0.9


@pytest.mark.slow
def test_real_datasets_have_no_test_leakage(tmp_path):
    _require(SHARED_DATA / "sst2")
    _require(SHARED_DATA / "fsdd")
    assert main(["data", "sst2", "--dir", str(SHARED_DATA / "sst2"), "--out", str(tmp_path / "s")]) == 0
    sst2 = check_manifest(tmp_path / "s" / "manifest.csv", CheckOptions(label_errors=False), progress=False)
    # Three short stock phrases are in train and val ("too bad", "i like it", "what 's next ?"); none in test.
    assert (sst2.leakage.val_in_train, sst2.leakage.test_in_train) == (3, 0)
    assert quick_check(read_manifest(tmp_path / "s" / "manifest.csv").rows).refusal() is None
    args = ["--fsdd", str(SHARED_DATA / "fsdd"), "--images", str(SHARED_DATA / "sign_digits")]
    assert main(["data", "avdigits", *args, "--out", str(tmp_path / "av")]) == 0
    av = check_manifest(tmp_path / "av" / "manifest.csv", CheckOptions(label_errors=False), progress=False)
    assert av.leakage.val_in_train == av.leakage.test_in_train == 0
    assert all(not g.cross_split for m in av.modalities.values() for g in m.exact + m.near)


@pytest.mark.slow  # imports the training code (torch)
def test_training_refuses_leakage(planted, tmp_path):
    from polysense.models.training.data_prep import prepare_data
    from polysense.models.training.options import TrainOptions

    rows = [r for r in csv.DictReader(planted.open())][:12]
    rows.append(dict(rows[4], split="test"))  # line 6's sample (train) again, in test
    folder = tmp_path / "data"
    folder.mkdir()
    for name in {r[c] for r in rows for c in ("image", "audio") if r[c]}:
        (folder / name).write_bytes((planted.parent / name).read_bytes())
    manifest = _write(folder, rows)
    options = TrainOptions(data=str(manifest), out=str(tmp_path / "run"), progress=False)
    (tmp_path / "run").mkdir()
    with pytest.raises(ConfigError, match="--allow-leakage"):
        prepare_data(options, tmp_path / "run")


def test_flags_of_a_weak_quick_model_come_with_a_caution():
    from polysense.tools.data_check.label_errors import LabelIssues
    from polysense.tools.data_check.report import _label_lines

    weak = _label_lines(LabelIssues(True, "quick", 100, 5, 0.38, ()))
    assert any("caution: the quick model itself misreads 62% of the rows" in line for line in weak)
    assert not any("caution" in line for line in _label_lines(LabelIssues(True, "quick", 100, 5, 0.97, ())))
