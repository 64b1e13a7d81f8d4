"""Edge bundles: one variant per component in ORT format, served like full bundles, also as one .tar that
cannot unpack anything outside its temporary folder."""

import io
import json
import os
import tarfile

import numpy as np
import pytest

pytest.importorskip("onnxruntime")

import polysense  # noqa: E402
from polysense.bundle.archive import _unpack, write_archive  # noqa: E402
from polysense.cli.main import main  # noqa: E402
from polysense.errors import BundleError, ConfigError  # noqa: E402
from polysense.tools.edge import OPERATORS_FILE, make_edge_bundle  # noqa: E402


@pytest.fixture(scope="module")
def edge(bundle, tmp_path_factory):
    return make_edge_bundle(bundle, tmp_path_factory.mktemp("edge") / "edge")


def _probs(prediction):
    return np.array(list(prediction.probabilities.values()))


def test_edge_predictions_equal_the_source_bundles(bundle, edge, test_rows):
    full = polysense.Pipeline.load(bundle, device="cpu")
    small = polysense.Pipeline.load(edge.path, device="cpu")
    assert small.precisions == full.precisions == edge.precisions  # the variants auto picks on CPU
    assert small.description.is_edge and not full.description.is_edge
    for row in test_rows[:8]:
        for sample in ({"image": row.image, "text": row.text, "audio": row.audio}, {"audio": row.audio}):
            a, b = full.predict(**sample), small.predict(**sample)
            assert a.label == b.label
            np.testing.assert_allclose(_probs(a), _probs(b), atol=1e-5)
    stream = small.audio_stream()
    stream.accept_waveform(np.zeros(16000, np.float32), 16000)
    stream.input_finished()
    assert stream.result().label in small.labels


def test_the_edge_folder_holds_one_ort_file_per_component_and_the_operator_list(edge):
    files = sorted(p.name for p in edge.path.iterdir())
    ort_files = [f for f in files if f.endswith(".ort")]
    assert len(ort_files) == 4 and all(f"{n}.{p}.ort" in ort_files for n, p in edge.precisions.items())
    assert {"bundle.json", "tokenizer.json", OPERATORS_FILE} <= set(files)
    for name in ort_files:
        assert (edge.path / name).read_bytes()[4:8] == b"ORTM"  # ORT format, not ONNX
    config = (edge.path / OPERATORS_FILE).read_text()
    assert "--include_ops_by_config" in config and "ai.onnx;" in config and "Gemm" in config
    assert edge.bytes < edge.source_bytes
    description = json.loads((edge.path / "bundle.json").read_text())
    assert description["schema_version"] == 3 and description["producer"]["edge"]["format"] == "ort"


def test_an_edge_bundle_is_checked_like_any_bundle(edge, tmp_path):
    import shutil

    altered = tmp_path / "altered"
    shutil.copytree(edge.path, altered)
    name = next(p for p in altered.iterdir() if p.name.startswith("fusion"))
    data = bytearray(name.read_bytes())
    data[-1] ^= 1
    name.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="does not match its sha256"):
        polysense.Pipeline.load(altered, device="cpu")


def test_a_tar_edge_bundle_loads_directly(bundle, tmp_path, test_rows):
    result = make_edge_bundle(bundle, tmp_path / "packed", archive=True)
    assert result.path.name == "packed.tar" and result.path.is_file()
    packed = polysense.Pipeline.load(result.path, device="cpu")
    full = polysense.Pipeline.load(bundle, device="cpu")
    row = test_rows[0]
    np.testing.assert_allclose(
        _probs(packed.predict(text=row.text)), _probs(full.predict(text=row.text)), atol=1e-5
    )
    assert not list(tmp_path.glob(".*partial"))


def _tar(path, members):
    with tarfile.open(path, "w") as archive:
        for info, data in members:
            archive.addfile(info, io.BytesIO(data) if data is not None else None)


def _file(name, data=b"x"):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info, data


def _link(name, target, kind=tarfile.SYMTYPE):
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    return info, None


@pytest.mark.parametrize(
    "members, message",
    [
        ([_file("../escape.txt")], "not a plain file name"),
        ([_file("/etc/evil")], "not a plain file name"),
        ([_file("sub/bundle.json")], "not a plain file name"),
        ([_link("bundle.json", "/etc/passwd")], "not a regular file"),
        ([_link("bundle.json", "x", tarfile.LNKTYPE)], "not a regular file"),
        ([_file("bundle.json"), _file("bundle.json")], "appears twice"),
        ([_file(f"f{i}") for i in range(65)], "more than 64 members"),
    ],
)
def test_a_hostile_tar_is_refused_before_anything_is_written(tmp_path, members, message):
    path = tmp_path / "hostile.tar"
    _tar(path, members)
    with pytest.raises(BundleError, match=message):
        polysense.Pipeline.load(path, device="cpu")
    assert not (tmp_path / "escape.txt").exists()


def test_edge_errors(bundle, edge, tmp_path, capsys):
    with pytest.raises(ConfigError, match="edge bundle already"):
        make_edge_bundle(edge.path, tmp_path / "again")
    with pytest.raises(ConfigError, match="exists"):
        make_edge_bundle(bundle, edge.path)
    with pytest.raises(ConfigError, match="does not exist"):
        make_edge_bundle(bundle, tmp_path / "no" / "such" / "edge")
    packed = make_edge_bundle(bundle, tmp_path / "packed", archive=True).path
    (tmp_path / "cut.tar").write_bytes(packed.read_bytes()[: packed.stat().st_size // 2])
    with pytest.raises(BundleError, match="damaged|not a readable"):
        polysense.Pipeline.load(tmp_path / "cut.tar", device="cpu")
    (tmp_path / "not.tar").write_bytes(b"not a tar at all" * 100)
    with pytest.raises(BundleError, match="not a readable .tar"):
        polysense.Pipeline.load(tmp_path / "not.tar", device="cpu")
    assert main(["edge", str(tmp_path / "missing"), "--out", str(tmp_path / "e")]) == 2
    assert capsys.readouterr().err.startswith("error: bundle not found")


def test_edge_cli_writes_the_bundle_and_prints_the_build_command(bundle, tmp_path, capsys):
    assert main(["edge", str(bundle), "--out", str(tmp_path / "cli")]) == 0
    out = capsys.readouterr().out
    assert "of the full bundle's files" in out and "--minimal_build" in out
    assert (tmp_path / "cli" / "bundle.json").is_file() and (tmp_path / "cli" / "probe.npz").is_file()
    assert main(["edge", str(bundle), "--out", str(tmp_path / "small"), "--no-probe"]) == 0
    assert not (tmp_path / "small" / "probe.npz").exists()
    assert polysense.Pipeline.load(tmp_path / "small", device="cpu").description.is_edge


def _gnu_sparse_member(name, unpacked_bytes, data=b"z" * 512):
    """A GNU sparse member (type 'S', as `tar --sparse` writes it): `data` stored at the end of a file of
    `unpacked_bytes`, the rest a hole; tarfile cannot write one, so its header is patched by hand."""
    info = tarfile.TarInfo(name)
    info.type, info.size = tarfile.GNUTYPE_SPARSE, len(data)
    header = bytearray(info.tobuf(format=tarfile.GNU_FORMAT))
    number = lambda n: tarfile.itn(n, 12, tarfile.GNU_FORMAT)  # noqa: E731
    header[386:410] = number(unpacked_bytes - len(data)) + number(len(data))  # the first (offset, size) entry
    header[483:495] = number(unpacked_bytes)  # the size it unpacks to
    header[148:156] = b" " * 8
    header[148:156] = b"%06o\0 " % sum(header[:512])  # the checksum over the patched header
    return bytes(header) + data.ljust(-(-len(data) // 512) * 512, b"\0")


def _pax_sparse_member(name, unpacked_bytes, data=b"z" * 512):
    """The same as a PAX member with GNU sparse map 0.1 headers (`tar --sparse --format=posix`)."""
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.pax_headers = {
        "GNU.sparse.map": f"{unpacked_bytes - len(data)},{len(data)}",
        "GNU.sparse.size": str(unpacked_bytes),
    }
    member = io.BytesIO()
    with tarfile.open(fileobj=member, mode="w", format=tarfile.PAX_FORMAT) as archive:
        archive.addfile(info, io.BytesIO(data))
        end = archive.offset  # where the member ends and the end-of-archive blocks begin
    return member.getvalue()[:end]


def _bytes_written() -> int:
    """Bytes this process has passed to write() so far (Linux)."""
    with open("/proc/self/io") as io_stats:
        return next(int(line.split()[1]) for line in io_stats if line.startswith("wchar:"))


@pytest.mark.skipif(not os.path.exists("/proc/self/io"), reason="counts bytes written through /proc/self/io")
@pytest.mark.parametrize("sparse_member", [_gnu_sparse_member, _pax_sparse_member])
def test_a_sparse_member_is_refused_before_its_holes_are_written(bundle, tmp_path, sparse_member):
    path = tmp_path / "sparse.tar"
    write_archive(bundle, tmp_path / "plain.tar")
    unpacked = 256 << 20
    path.write_bytes(sparse_member("padding.bin", unpacked) + (tmp_path / "plain.tar").read_bytes())
    with tarfile.open(path) as archive:  # what tarfile makes of it: a regular, sparse member of 256 MB
        member = archive.getmember("padding.bin")
        assert member.isreg() and member.issparse() and member.size == unpacked
    assert path.stat().st_size < 2 * (tmp_path / "plain.tar").stat().st_size
    before = _bytes_written()
    with pytest.raises(BundleError, match="'padding.bin' is a sparse file .*make the archive again"):
        polysense.Pipeline.load(path, device="cpu")
    assert _bytes_written() - before < 1 << 20  # 256 MB before: every hole written out as zeros


def test_members_declaring_more_than_the_archive_holds_are_refused(tmp_path):
    path = tmp_path / "lying.tar"
    info, _ = _file("bundle.json")
    info.size = 64 << 20  # the header claims 64 MB; the archive holds 1 KB of it
    path.write_bytes(info.tobuf() + b"{" * 1024)
    with pytest.raises(BundleError, match="declare 67,108,864 bytes, more than the archive's 1,536"):
        polysense.Pipeline.load(path, device="cpu")


def test_unpacking_stops_at_its_budget_whatever_the_headers_say(tmp_path):
    path = tmp_path / "one.tar"
    _tar(path, [_file("bundle.json", b"x" * 5000)])
    refused = pytest.raises(BundleError, match="unpacks to more bytes than the archive holds")
    with tarfile.open(path) as archive, refused:
        _unpack(path, archive, archive.getmember("bundle.json"), tmp_path / "out", budget=4096)
    assert (tmp_path / "out").stat().st_size == 0  # the 5000-byte block was counted before it was written


def test_an_edge_bundle_without_fp32_names_the_edge_bundle_to_make_instead(bundle, tmp_path, capsys):
    # Issue 43: --precision fp32 warned "they run fp32", then failed "has no fp32 variant"; fp16 suggested fp32.
    half = make_edge_bundle(bundle, tmp_path / "half", precision="fp16")
    assert set(half.precisions.values()) == {"fp16"}
    for precision in ("fp32", "int8"):
        with pytest.raises(ConfigError, match=f"no {precision} and no fp32 to fall back on") as refused:
            polysense.Pipeline.load(half.path, device="cpu", precision=precision)
        assert f"polysense edge FULL_BUNDLE --out DIR --precision {precision}" in str(refused.value)
    assert main(["predict", str(half.path), "--text", "hi", "--precision", "fp32"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: this edge bundle keeps one variant") and err.count("\n") == 1
    # What the message says to do works: an fp32 edge bundle serves --precision fp32.
    assert main(["edge", str(bundle), "--out", str(tmp_path / "full"), "--precision", "fp32", "--quiet"]) == 0
    assert main(["predict", str(tmp_path / "full"), "--text", "hi", "--precision", "fp32"]) == 0


def test_edge_names_the_real_operator_list_and_prints_no_temporary_path(bundle, tmp_path, capfd):
    assert main(["edge", str(bundle), "--out", str(tmp_path / "e"), "--tar", "--quiet"]) == 0
    out, err = capfd.readouterr()
    assert "Created config" not in out + err and "/path/to/" not in out
    assert f"--include_ops_by_config {tmp_path.resolve() / OPERATORS_FILE}" in out
    assert f"tar -xf {tmp_path / 'e.tar'} -C {tmp_path} {OPERATORS_FILE}" in out


def test_info_reads_an_edge_tar_as_predict_does(bundle, tmp_path, capsys):
    make_edge_bundle(bundle, tmp_path / "e", archive=True)
    assert main(["info", str(tmp_path / "e.tar")]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"{tmp_path / 'e.tar'}: schema 3") and "image_encoder" in out
