"""`polysense predict --data ... --out ...`: many unlabelled samples from a folder or a manifest, bad ones
reported and skipped; `eval --predictions`; the runtime commands' common flags; `--version`."""

import csv
import json
import shutil

import numpy as np
import pytest

pytest.importorskip("onnxruntime")

import polysense  # noqa: E402
from polysense.cli.main import main  # noqa: E402


def _run(capsys, *argv):
    code = main(["--quiet", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def folder(tmp_path, test_rows):
    """Two photos, two recordings, a text file, a file of another kind and a corrupt photo."""
    folder = tmp_path / "inputs"
    (folder / "sub").mkdir(parents=True)
    for index, row in enumerate(test_rows[:2]):
        shutil.copy(row.image, folder / f"photo{index}.jpg")
        shutil.copy(row.audio, folder / "sub" / f"clip{index}.wav")
    (folder / "note.txt").write_text(test_rows[0].text)
    (folder / "readme.md").write_text("not an input")
    (folder / "broken.jpg").write_bytes(b"not a jpeg")
    return folder


def test_a_folder_is_predicted_file_by_file_and_bad_files_are_skipped(
    capsys, bundle, pipe, folder, test_rows, tmp_path
):
    out = tmp_path / "preds.jsonl"
    code, _, err = _run(capsys, "predict", bundle, "--data", folder, "--out", out, "--precision", "fp32")
    assert code == 0
    rows = {r["source"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert set(rows) == {"photo0.jpg", "photo1.jpg", "sub/clip0.wav", "sub/clip1.wav", "note.txt"}
    expected = pipe.predict(audio=test_rows[1].audio)
    assert rows["sub/clip1.wav"]["label"] == expected.label and rows["sub/clip1.wav"]["modalities"] == "audio"
    got = [rows["sub/clip1.wav"]["probabilities"][k] for k in expected.probabilities]
    np.testing.assert_allclose(got, list(expected.probabilities.values()), atol=1e-5)
    assert rows["note.txt"]["label"] == pipe.predict(text=test_rows[0].text).label
    assert "readme.md: not a file this bundle takes" in err and "broken.jpg" in err
    assert "wrote 5 predictions" in err and "2 samples skipped" in err


def test_an_unlabelled_manifest_gives_a_csv_with_every_probability(capsys, bundle, pipe, test_rows, tmp_path):
    manifest = tmp_path / "todo.csv"
    with manifest.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", "text"])
        for row in test_rows[:3]:
            writer.writerow([row.image, row.text])
        writer.writerow([str(tmp_path / "missing.jpg"), "a calm square"])
    out = tmp_path / "preds.csv"
    code, _, err = _run(capsys, "predict", bundle, "--data", manifest, "--out", out, "--precision", "fp32")
    assert code == 0 and "missing.jpg" in err
    with out.open() as handle:
        rows = list(csv.DictReader(handle))
    assert [r["source"] for r in rows] == ["todo.csv:2", "todo.csv:3", "todo.csv:4"]
    expected = pipe.predict(image=test_rows[2].image, text=test_rows[2].text)
    assert rows[2]["label"] == expected.label and rows[2]["modalities"] == "image+text"
    np.testing.assert_allclose(
        [float(rows[2][f"p_{k}"]) for k in expected.probabilities],
        list(expected.probabilities.values()),
        atol=1e-5,
    )
    assert not list(tmp_path.glob(".*partial"))  # written beside, renamed at the end


def test_eval_writes_each_samples_prediction_and_true_label(capsys, bundle, split_manifest, tmp_path):
    out = tmp_path / "eval.jsonl"
    code, printed, _ = _run(
        capsys,
        "eval",
        bundle,
        "--data",
        split_manifest,
        "--split",
        "test",
        "--json",
        "--predictions",
        out,
    )
    assert code == 0
    metrics = json.loads(printed)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == int(np.sum(metrics["confusion_matrix"])) > 0
    accuracy = np.mean([r["label"] == r["true_label"] for r in rows])
    assert accuracy == pytest.approx(metrics["accuracy"])


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--data", "DATA"], "--data and --out go together"),
        (["--data", "DATA", "--out", "x.txt"], "write .jsonl or .csv"),
        (["--data", "DATA", "--out", "OUT", "--text", "hi"], "leave out --text"),
        (["--data", "MISSING", "--out", "OUT"], "manifest not found"),
        (["--data", "EMPTY", "--out", "OUT"], "holds no files"),
        (["--text", "hi", "--threads", "-1"], None),
    ],
)
def test_predict_many_errors_are_one_line(capsys, bundle, folder, tmp_path, argv, message):
    (tmp_path / "empty").mkdir()
    names = {
        "DATA": folder,
        "MISSING": tmp_path / "nope.csv",
        "EMPTY": tmp_path / "empty",
        "OUT": tmp_path / "o.csv",
    }
    argv = [str(names.get(a, a)) for a in argv]
    if message is None:  # argparse's own refusal of a bad value
        with pytest.raises(SystemExit):
            main(["predict", str(bundle), *argv])
        assert "must be 0 or more" in capsys.readouterr().err
        return
    code, _, err = _run(capsys, "predict", bundle, *argv)
    assert code == 2 and err.startswith("error: ") and message in err and len(err.strip().splitlines()) == 1


def test_the_runtime_commands_take_precision_and_threads(capsys, bundle, pipe):
    code, out, _ = _run(
        capsys,
        "predict",
        bundle,
        "--text",
        "a calm square",
        "--precision",
        "fp32",
        "--threads",
        "1",
        "--json",
    )
    assert code == 0
    assert json.loads(out)["probabilities"] == pytest.approx(
        pipe.predict(text="a calm square").probabilities, abs=1e-6
    )


def test_version(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["--version"])
    assert stop.value.code == 0 and capsys.readouterr().out.strip() == f"polysense {polysense.__version__}"


def test_texts_run_grouped_by_length_and_are_written_in_input_order(pipe, tmp_path, monkeypatch):
    """A batch pads its texts to its longest: the batches a file is run in hold texts of similar length (so
    fewer pad tokens are computed), and the output keeps the input's order and each sample's own answer."""
    from polysense.tools import batch_predict

    rng = np.random.default_rng(0)
    words = [
        "red",
        "green",
        "blue",
        "calm",
        "loud",
        "quiet",
        "square",
        "circle",
        "bright",
        "dark",
        "morning",
        "rain",
    ]
    texts = [" ".join(rng.choice(words, size=int(rng.integers(1, 10)))) for _ in range(300)]
    manifest = tmp_path / "texts.csv"
    with manifest.open("w", newline="") as handle:
        csv.writer(handle).writerows([["text"], *([t] for t in texts)])
    seen: list[list[int]] = []
    original = pipe.predict_batch

    def spy(prepared):
        seen.append([p.features["text"].size for p in prepared])
        return original(prepared)

    monkeypatch.setattr(pipe, "predict_batch", spy)
    monkeypatch.setattr(batch_predict, "GROUPED", 128)  # two groups of four batches and a part of one
    out = tmp_path / "out.jsonl"
    result = batch_predict.predict_to_file(pipe, manifest, out, progress=False)
    assert result.written == 300
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["source"] for r in rows] == [f"texts.csv:{line}" for line in range(2, 302)]
    for row, text in list(zip(rows, texts))[::30]:
        assert row["label"] == original([pipe.prepare({"text": text})])[0].label
    in_order = [pipe.prepare({"text": t}).features["text"].size for t in texts]
    groups = [in_order[i : i + 128] for i in range(0, 300, 128)]
    unsorted = [g[i : i + batch_predict.BATCH] for g in groups for i in range(0, len(g), batch_predict.BATCH)]
    assert sorted(map(len, seen)) == sorted(map(len, unsorted))  # the same number of runs, of the same sizes
    padding = lambda batches: sum(max(b) * len(b) - sum(b) for b in batches)  # noqa: E731
    # The text's length in characters stands for its tokens (known before it is read and tokenized): on these
    # words, many of them split into characters by the tiny bundle's tokenizer, a loose stand-in.
    assert padding(seen) < 0.6 * padding(unsorted)
