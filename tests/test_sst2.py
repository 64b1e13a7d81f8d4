"""`polysense data sst2`: SST-2 as a manifest, dev as test, a stratified share of train as validation."""

from collections import Counter

import pytest
from conftest import SHARED_DATA, _require

from polysense.cli.main import main
from polysense.errors import InputError
from polysense.tools.manifest import read_manifest


@pytest.mark.slow
def test_sst2_manifest_keeps_dev_as_test_and_holds_out_validation(tmp_path, capsys):
    folder = _require(SHARED_DATA / "sst2")
    assert main(["data", "sst2", "--dir", str(folder), "--out", str(tmp_path)]) == 0
    assert "train 6228, val 692, test 872" in capsys.readouterr().out
    rows = read_manifest(tmp_path / "manifest.csv").rows
    by_split = {s: Counter(r.label for r in rows if r.split == s) for s in ("train", "val", "test")}
    assert sum(by_split["test"].values()) == 872
    for label in ("negative", "positive"):  # stratified: each label keeps its share in val
        share = by_split["val"][label] / (by_split["val"][label] + by_split["train"][label])
        assert share == pytest.approx(0.1, abs=0.002)
    assert all(r.text and r.image is None and r.audio is None for r in rows)


def test_a_malformed_sst2_file_is_refused(tmp_path):
    from polysense.datasets.sst2 import SST2Spec, write_sst2

    (tmp_path / "train.tsv").write_text("a fine film\t1\nno label here\n")
    (tmp_path / "dev.tsv").write_text("ok\t0\n")
    with pytest.raises(InputError, match=r"train.tsv:2: expected 'sentence<TAB>0\|1'"):
        write_sst2(SST2Spec(str(tmp_path)), tmp_path / "out")
    with pytest.raises(InputError, match="train.tsv is missing; --dir must hold"):
        write_sst2(SST2Spec(str(tmp_path / "nowhere")), tmp_path / "out")
