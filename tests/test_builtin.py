import csv
import hashlib
from collections import defaultdict

import pytest

from polysense.datasets.builtin import LABELS, BuiltinSpec, write_builtin
from polysense.errors import InputError


def _digest(folder):
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in folder.rglob("*")
        if p.is_file()
    }


def test_deterministic_for_a_seed(tmp_path):
    a = write_builtin(tmp_path / "a", BuiltinSpec(n=24, seed=5), progress=False).parent
    b = write_builtin(tmp_path / "b", BuiltinSpec(n=24, seed=5), progress=False).parent
    c = write_builtin(tmp_path / "c", BuiltinSpec(n=24, seed=6), progress=False).parent
    assert _digest(a) == _digest(b)
    assert _digest(a) != _digest(c)


def test_each_modality_carries_one_attribute(tiny_builtin):
    rows = list(csv.DictReader(tiny_builtin.open()))
    assert len(rows) == 360 and {r["label"] for r in rows} == set(LABELS)
    # The image attribute (shape) leaves 4 labels possible, text (mood) and audio (sweep) 6 each:
    # the single-modality ceilings of 25 %, 16.7 % and 16.7 % documented in polysense.datasets.builtin.
    labels_by = {i: defaultdict(set) for i in range(3)}
    for r in rows:
        for i, value in enumerate(r["label"].split("-")):
            labels_by[i][value].add(r["label"])
    assert {len(v) for v in labels_by[0].values()} == {4}
    assert {len(v) for v in labels_by[1].values()} == {6}
    assert {len(v) for v in labels_by[2].values()} == {6}
    assert all(
        (tiny_builtin.parent / r["image"]).is_file() and (tiny_builtin.parent / r["audio"]).is_file()
        for r in rows
    )


def test_refuses_to_overwrite_and_too_small(tmp_path):
    write_builtin(tmp_path / "d", BuiltinSpec(n=12), progress=False)
    with pytest.raises(InputError, match="already holds"):
        write_builtin(tmp_path / "d", BuiltinSpec(n=12), progress=False)
    with pytest.raises(InputError, match="too small"):
        write_builtin(tmp_path / "e", BuiltinSpec(n=5), progress=False)


def test_cli_writes_the_builtin_set(tmp_path, capsys):
    from polysense.cli.main import main

    assert main(["data", "builtin", "--out", str(tmp_path / "d"), "--n", "12", "--seed", "1"]) == 0
    assert "wrote 12 samples" in capsys.readouterr().out
    assert len(list(csv.DictReader((tmp_path / "d" / "manifest.csv").open()))) == 12
    assert main(["data", "builtin", "--out", str(tmp_path / "d"), "--n", "12"]) == 2
    assert "already holds a dataset" in capsys.readouterr().err
