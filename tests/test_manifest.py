import json

import cv2
import numpy as np
import pytest

from polysense import ImagePreprocessor, InputError, ManifestError
from polysense.tools.manifest import (
    check_labels,
    preprocess_rows,
    read_manifest,
    stratified_split,
    write_manifest,
)


@pytest.fixture
def files(tmp_path):
    cv2.imwrite(str(tmp_path / "good.jpg"), np.full((20, 20, 3), 100, np.uint8))
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8 this is not really a jpeg")
    return tmp_path


def _write(path, text):
    path.write_text(text)
    return path


def test_every_bad_row_is_reported_with_its_line(files):
    manifest = _write(
        files / "m.csv",
        "image,text,label,split\n"
        "good.jpg,hello,a,train\n"  # line 2: fine
        "missing.jpg,hello,a,train\n"  # line 3: file not found
        ",,,\n"  # line 4: empty row
        "good.jpg,hi,,train\n"  # line 5: no label
        ",,b,train\n"  # line 6: no modality
        "good.jpg,hi,a,holdout\n"  # line 7: unknown split
        "good.jpg,hi,a,\n",  # line 8: split missing while others have one
    )
    parsed = read_manifest(manifest)
    found = {p.line: p.reason for p in parsed.problems}
    assert set(found) == {3, 4, 5, 6, 7, 8}
    assert "file not found: missing.jpg" in found[3]
    assert "empty row" in found[4]
    assert "label is empty" in found[5]
    assert "no modality present" in found[6]
    assert "'holdout' is unknown" in found[7]
    assert "split is empty" in found[8]
    with pytest.raises(ManifestError) as error:
        parsed.raise_if_problems()
    assert (
        "line 3" in str(error.value) and "line 8" in str(error.value) and "6 problem(s)" in str(error.value)
    )


def test_unreadable_file_is_reported_by_preprocessing(files):
    parsed = read_manifest(_write(files / "m.csv", "image,label\ngood.jpg,a\nbroken.jpg,b\n"))
    assert parsed.problems == []
    features, problems = preprocess_rows(parsed.rows, {"image": ImagePreprocessor(size=16)}, progress=False)
    assert features["image"][0].shape == (3, 16, 16) and features["image"][1] is None
    assert [p.line for p in problems] == [3]
    assert "cannot decode" in problems[0].reason


def test_unknown_label_and_columns(files):
    parsed = read_manifest(_write(files / "m.csv", "image,label,colour\ngood.jpg,a,red\n"))
    assert any("unknown column 'colour'" in str(p) for p in parsed.problems)
    parsed = read_manifest(_write(files / "m.csv", "image,label\ngood.jpg,a\n"))
    problems = check_labels(parsed.rows, ["b"], "it never occurs in the train split")
    assert problems[0].line == 2 and "unknown label 'a'" in problems[0].reason


def test_jsonl_manifest(files):
    lines = [
        json.dumps({"image": "good.jpg", "text": "hi there", "label": 3}),
        "{broken json",
        json.dumps({"text": None, "image": None, "label": "x"}),
        "",
        json.dumps(["not", "an", "object"]),
    ]
    parsed = read_manifest(_write(files / "m.jsonl", "\n".join(lines) + "\n"))
    assert parsed.rows[0].label == "3" and parsed.rows[0].text == "hi there"
    assert parsed.rows[0].image == str((files / "good.jpg").resolve())
    found = {p.line: p.reason for p in parsed.problems}
    assert set(found) == {2, 3, 5}
    assert "not valid JSON" in found[2] and "no modality" in found[3] and "JSON object" in found[5]


def test_quoted_cells_and_missing_label_column(files):
    parsed = read_manifest(_write(files / "m.csv", 'text,label\n"hello, world",a\n'))
    assert parsed.rows[0].text == "hello, world" and parsed.problems == []
    assert "no 'label' column" in str(read_manifest(_write(files / "n.csv", "text\nhi\n")).problems[0])


def test_missing_and_unknown_manifest_files(tmp_path):
    with pytest.raises(InputError, match="not found"):
        read_manifest(tmp_path / "nope.csv")
    with pytest.raises(InputError, match="unknown manifest type"):
        read_manifest(_write(tmp_path / "m.txt", "x"))


def test_stratified_split_is_seeded_and_stratified(files):
    text = "text,label\n" + "".join(f"t{i},{'ab'[i % 2]}\n" for i in range(100))
    rows = read_manifest(_write(files / "m.csv", text)).rows
    first, again, other = stratified_split(rows, 1), stratified_split(rows, 1), stratified_split(rows, 2)
    assert [r.split for r in first] == [r.split for r in again]
    assert [r.split for r in first] != [r.split for r in other]
    for label in "ab":
        splits = [r.split for r in first if r.label == label]
        assert (splits.count("train"), splits.count("val"), splits.count("test")) == (40, 5, 5)


def test_written_manifest_reads_back(files, tmp_path):
    rows = read_manifest(_write(files / "m.csv", "image,text,label,split\ngood.jpg,hi,a,test\n")).rows
    out = tmp_path / "run" / "manifest.csv"
    out.parent.mkdir()
    write_manifest(rows, out)
    again = read_manifest(out)
    assert again.problems == [] and again.rows[0].image == rows[0].image and again.rows[0].split == "test"


def test_a_csv_saved_with_a_byte_order_mark_reads(tmp_path):
    path = tmp_path / "excel.csv"
    path.write_text("text,label\na calm day,calm\n", encoding="utf-8-sig")
    manifest = read_manifest(path)
    assert not manifest.problems and manifest.rows[0].text == "a calm day"


def test_a_header_typo_is_one_problem_not_one_per_row(tmp_path):
    path = tmp_path / "typo.csv"
    path.write_text("text,lable\n" + "".join(f"text {i},calm\n" for i in range(200)))
    manifest = read_manifest(path)
    assert [p.line for p in manifest.problems] == [0, 0]  # the unknown column and the missing label column
    with pytest.raises(ManifestError) as error:
        manifest.raise_if_problems()
    assert "before training" not in str(error.value) and "unknown column 'lable'" in str(error.value)
