"""Signed bundles: `polysense keygen`, `polysense bundle sign`, and `trusted_keys=` / `--trusted-key` refusing an
unsigned bundle, a signature by another key, or a bundle changed after it was signed (docs/security.md)."""

import base64
import json
import shutil
import socket
import stat
import subprocess
import sys

import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("cryptography")

import polysense  # noqa: E402
from polysense.bundle.signing import SIGNATURE_FILE, generate_key, sign_description  # noqa: E402
from polysense.cli.main import main  # noqa: E402
from polysense.errors import BundleError, ConfigError, DependencyError  # noqa: E402
from polysense.tools.tune import TUNING_FILE, tune_bundle  # noqa: E402


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    """Two key pairs: (private, public) each."""
    folder = tmp_path_factory.mktemp("keys")
    return generate_key(folder / "signer"), generate_key(folder / "stranger")


@pytest.fixture
def signed(copied_bundle, keys):
    sign_description(copied_bundle, keys[0][0])
    return copied_bundle


def _load(path, trusted):
    return polysense.Pipeline.load(path, device="cpu", precision="fp32", trusted_keys=trusted)


def test_keygen_writes_a_private_key_only_its_owner_reads_and_never_overwrites(tmp_path, capsys):
    assert main(["keygen", "--out", str(tmp_path / "k")]) == 0
    assert stat.S_IMODE((tmp_path / "k").stat().st_mode) == 0o600
    assert b"PRIVATE KEY" in (tmp_path / "k").read_bytes()
    assert b"PUBLIC KEY" in (tmp_path / "k.pub").read_bytes()
    before = (tmp_path / "k").read_bytes()
    capsys.readouterr()
    assert main(["keygen", "--out", str(tmp_path / "k")]) == 2
    assert capsys.readouterr().err.count("error:") == 1
    assert (tmp_path / "k").read_bytes() == before
    (tmp_path / "only.pub").write_text("someone's")  # a public key in the way refuses too
    with pytest.raises(ConfigError, match="exists"):
        generate_key(tmp_path / "only")
    assert not (tmp_path / "only").exists()


def test_a_signed_bundle_loads_with_its_key_as_path_pem_or_raw_bytes(signed, keys, pipe):
    from cryptography.hazmat.primitives import serialization

    public = keys[0][1]
    pem = public.read_bytes()
    raw = serialization.load_pem_public_key(pem).public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    record = json.loads((signed / SIGNATURE_FILE).read_text())
    assert record["algorithm"] == "ed25519" and record["signed_file"] == "bundle.json"
    for trusted in ([public], [str(public)], public, [pem], [raw], [keys[1][1], public]):
        loaded = _load(signed, trusted)
        assert loaded.predict(text="one").probabilities == pipe.predict(text="one").probabilities


def test_without_trusted_keys_nothing_changes(copied_bundle, signed):
    _load(copied_bundle, None)  # unsigned: loads as before
    (signed / SIGNATURE_FILE).write_text("garbage")  # a signature is not even read without trusted keys
    _load(signed, None)


def test_an_unsigned_bundle_is_refused_when_keys_are_trusted(copied_bundle, keys):
    with pytest.raises(BundleError, match="not signed.*polysense bundle sign"):
        _load(copied_bundle, [keys[0][1]])


def test_a_signature_by_another_key_is_refused(signed, keys):
    with pytest.raises(BundleError, match="not one of the trusted keys"):
        _load(signed, [keys[1][1]])


def test_a_description_changed_after_signing_is_refused(signed, keys):
    description = json.loads((signed / "bundle.json").read_text())
    description["labels"] = description["labels"][::-1]  # valid, loadable, and a different model's meaning
    (signed / "bundle.json").write_text(json.dumps(description, indent=2) + "\n")
    _load(signed, None)  # the hashes still hold: only the signature can tell
    with pytest.raises(BundleError, match="changed after it was signed"):
        _load(signed, [keys[0][1]])
    (signed / "bundle.json").write_bytes((signed / "bundle.json").read_bytes() + b" ")  # one byte is enough
    with pytest.raises(BundleError, match="changed after it was signed"):
        _load(signed, [keys[0][1]])


def test_a_file_swapped_under_a_valid_signature_is_refused(signed, keys, other_bundle):
    # Same names, same sizes or not: the signed description's sha256 no longer matches the file.
    shutil.copyfile(other_bundle / "fusion.fp32.onnx", signed / "fusion.fp32.onnx")
    with pytest.raises(BundleError, match="fusion.fp32.onnx"):
        _load(signed, [keys[0][1]])


def test_another_bundles_signature_is_refused(signed, keys, other_bundle, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(other_bundle, other)
    shutil.copyfile(signed / SIGNATURE_FILE, other / SIGNATURE_FILE)
    with pytest.raises(BundleError, match="changed after it was signed"):
        _load(other, [keys[0][1]])


@pytest.mark.parametrize(
    "content",
    [
        "not json",
        "[]",
        "[" * 100_000,
        '{"polysense_signature": 1}',
        "BAD_ALGORITHM",
        "SHORT",
        "NOT_BASE64",
        "OTHER_FILE",
        "KEY_ID_NUMBER",
    ],
)
def test_a_damaged_signature_file_is_refused_with_the_fix(signed, keys, content):
    record = json.loads((signed / SIGNATURE_FILE).read_text())
    edits = {
        "BAD_ALGORITHM": {"algorithm": "rsa"},
        "SHORT": {"signature": base64.b64encode(b"x" * 10).decode()},
        "NOT_BASE64": {"signature": "***"},
        "OTHER_FILE": {"signed_file": "tuning.json"},
        "KEY_ID_NUMBER": {"key_id": 7},
    }
    text = json.dumps({**record, **edits[content]}) if content in edits else content
    (signed / SIGNATURE_FILE).write_text(text)
    with pytest.raises(BundleError, match="polysense bundle sign"):
        _load(signed, [keys[0][1]])


def test_bad_trusted_keys_are_config_errors(signed, keys, tmp_path):
    with pytest.raises(ConfigError, match="empty"):
        _load(signed, [])  # never "no keys, so no check"
    with pytest.raises(ConfigError, match="private key"):
        _load(signed, [keys[0][0]])
    with pytest.raises(ConfigError, match="not found"):
        _load(signed, [tmp_path / "nope.pub"])
    (tmp_path / "bad.pub").write_text("-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n")
    with pytest.raises(ConfigError, match="not a PEM public key"):
        _load(signed, [tmp_path / "bad.pub"])


def test_an_ensemble_checks_every_member(signed, keys, other_bundle, tmp_path):
    with pytest.raises(BundleError, match="not signed"):
        polysense.Ensemble.load([signed, other_bundle], device="cpu", trusted_keys=[keys[0][1]])
    other = tmp_path / "other"
    shutil.copytree(other_bundle, other)
    sign_description(other, keys[0][0])
    ensemble = polysense.Ensemble.load([signed, other], device="cpu", trusted_keys=[keys[0][1]])
    assert len(ensemble.members) == 2


def test_tuning_stays_outside_the_signature_and_cannot_choose_files(signed, keys):
    tune_bundle(signed, device="cpu", measure=lambda pipeline, component, samples: 1.0)
    trusted = [keys[0][1]]
    tuned = polysense.Pipeline.load(signed, device="cpu", trusted_keys=trusted)
    assert tuned.precision_source == "tuned"  # tuning.json is not signed, and does not break the signature
    record = json.loads((signed / TUNING_FILE).read_text())
    for choice in ("int8", "../fusion.fp32.onnx", "fusion.fp16.onnx", "/etc/passwd"):
        choices = {name: choice for name in record["choices"]}
        (signed / TUNING_FILE).write_text(json.dumps({**record, "choices": choices}))
        loaded = polysense.Pipeline.load(signed, device="cpu", trusted_keys=trusted)
        assert loaded.precision_source == "export"
        assert set(loaded.precisions.values()) <= {"fp32", "fp16"}


def test_edge_bundles_of_a_signed_bundle_are_signed_anew(signed, keys, tmp_path):
    from polysense.tools.edge import make_edge_bundle

    with pytest.raises(ConfigError, match="--key"):
        make_edge_bundle(signed, tmp_path / "edge")
    with pytest.raises(BundleError, match="not one of the trusted keys"):
        make_edge_bundle(signed, tmp_path / "edge", key=keys[0][0], trusted_keys=_trusted(keys[1][1]))
    folder = make_edge_bundle(signed, tmp_path / "edge", key=keys[1][0], trusted_keys=_trusted(keys[0][1]))
    archive = make_edge_bundle(signed, tmp_path / "packed", archive=True, key=keys[1][0])
    for edge in (folder.path, archive.path):
        _load(edge, [keys[1][1]])
        with pytest.raises(BundleError, match="not one of the trusted keys"):
            _load(edge, [keys[0][1]])  # the source's signer did not sign the edge bundle


def _trusted(public):
    from polysense.bundle.signing import TrustedKeys

    return TrustedKeys.parse(public)


def test_cli_sign_and_trusted_key_errors_are_one_line(copied_bundle, keys, capsys, tmp_path):
    assert main(["predict", str(copied_bundle), "--text", "one", "--trusted-key", str(keys[0][1])]) == 2
    assert capsys.readouterr().err.strip().count("\n") == 0
    assert main(["bundle", "sign", str(copied_bundle), "--key", str(keys[0][1])]) == 2  # a public key
    assert "PEM private key" in capsys.readouterr().err
    assert main(["bundle", "sign", str(copied_bundle), "--key", str(keys[0][0])]) == 0
    assert "bundle.sig" in capsys.readouterr().out
    assert main(["predict", str(copied_bundle), "--text", "one", "--trusted-key", str(keys[0][1])]) == 0
    assert main(["info", str(copied_bundle), "--trusted-key", str(keys[1][1])]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and err.count("\n") == 1
    (copied_bundle / "tokenizer.json").write_text("{}")
    assert main(["bundle", "sign", str(copied_bundle), "--key", str(keys[0][0])]) == 2  # never sign damage
    assert "tokenizer.json" in capsys.readouterr().err


def test_serve_refuses_an_untrusted_bundle_at_startup(signed, keys):
    pytest.importorskip("starlette")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-m", "polysense.cli.main", "serve", str(signed), "--port", str(port)]
    result = subprocess.run(
        [*command, "--trusted-key", str(keys[1][1])], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 2
    assert result.stderr.startswith("error:") and "not one of the trusted keys" in result.stderr
    assert result.stderr.count("\n") == 1


def test_without_cryptography_the_error_names_the_extra(copied_bundle, keys, monkeypatch, capsys):
    # None in sys.modules is Python's documented way to make an import fail, as on a runtime without the extra.
    monkeypatch.setitem(sys.modules, "cryptography.hazmat.primitives.asymmetric.ed25519", None)
    with pytest.raises(DependencyError, match=r"pip install 'polysense\[sign\]'"):
        _load(copied_bundle, [keys[0][1]])
    assert main(["keygen", "--out", str(copied_bundle / "k")]) == 2
    assert "polysense[sign]" in capsys.readouterr().err
    _load(copied_bundle, None)  # loading without trusted keys never needs it


def test_slimming_a_signed_bundle_signs_it_anew_or_is_refused(signed, keys, capsys):
    description = (signed / "bundle.json").read_bytes()
    assert main(["bundle", "slim", str(signed), "--keep", "cpu"]) == 2  # a stale signature is never left
    err = capsys.readouterr().err
    assert err.startswith("error:") and err.count("\n") == 1 and "--key KEY" in err
    assert (signed / "bundle.json").read_bytes() == description  # refused before anything changed
    slim = ["bundle", "slim", str(signed), "--keep", "cpu", "--key", str(keys[1][0])]
    assert main([*slim, "--trusted-key", str(keys[1][1])]) == 2  # the source is checked first
    assert "not one of the trusted keys" in capsys.readouterr().err
    assert (signed / "bundle.json").read_bytes() == description
    assert main([*slim, "--trusted-key", str(keys[0][1])]) == 0
    assert (signed / "bundle.json").read_bytes() != description
    _load(signed, [keys[1][1]])  # the slimmed bundle, signed by whoever slimmed it
    with pytest.raises(BundleError, match="not one of the trusted keys"):
        _load(signed, [keys[0][1]])


def test_slimming_an_unsigned_bundle_can_sign_it(copied_bundle, keys):
    from polysense.bundle.slim import slim_bundle

    slim_bundle(copied_bundle, "fp32", key=keys[0][0])
    _load(copied_bundle, [keys[0][1]])
