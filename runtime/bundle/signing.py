"""Signed bundles: an Ed25519 signature over bundle.json, which holds the sha256 of every file a Pipeline loads.

`polysense keygen --out KEY` writes a private key (KEY, PEM, mode 0600) and its public key (KEY.pub);
`polysense bundle sign BUNDLE --key KEY` writes bundle.sig beside bundle.json; `Pipeline.load(...,
trusted_keys=[...])` and `--trusted-key` refuse a bundle without a valid signature by one of those keys. The
signature covers the exact bytes of bundle.json (after the context line SIGNED_CONTEXT), and those bytes are
the ones parsed: the files it lists are then checked against their hashes as they are read. It says nothing
about files bundle.json does not list (tuning.json, probe.npz), which never choose what is loaded.
Needs the `cryptography` package: pip install 'polysense[sign]'.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from polysense.bundle.schema import DESCRIPTION_FILE
from polysense.errors import BundleError, ConfigError, DependencyError

SIGNATURE_FILE = "bundle.sig"
ALGORITHM = "ed25519"
SIGNATURE_FORMAT = 1
SIGNED_CONTEXT = (
    b"polysense bundle signature 1\n"  # signed before bundle.json's bytes: a signature means one thing
)
MAX_KEY_BYTES = 64 << 10  # a PEM key is a few hundred bytes
MAX_SIGNATURE_BYTES = 64 << 10
_SIGN_AGAIN = "sign it again with `polysense bundle sign BUNDLE --key KEY`"

KeySource = str | os.PathLike | bytes


def _crypto() -> ModuleType:
    """cryptography's Ed25519 and serialization modules, or a DependencyError naming the extra."""
    try:
        import cryptography.hazmat.primitives.asymmetric.ed25519  # noqa: F401
        import cryptography.hazmat.primitives.serialization  # noqa: F401
    except ImportError as error:
        raise DependencyError(
            f"cryptography is not installed ({error}); signed bundles need it: pip install 'polysense[sign]'"
        ) from error
    import cryptography.hazmat.primitives as primitives

    return primitives


def key_id(public_key: Any) -> str:
    """The sha256 (hex) of the key's 32 raw bytes: what bundle.sig names the key by."""
    serialization = _crypto().serialization
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()


@dataclass(frozen=True)
class TrustedKeys:
    """The public keys a bundle's signature must come from, by key id (parsed once, at load)."""

    keys: dict[str, Any]  # key id -> Ed25519PublicKey

    @classmethod
    def parse(cls, sources: TrustedKeys | KeySource | Sequence[KeySource]) -> TrustedKeys:
        """Paths to public keys (PEM, as keygen writes KEY.pub), PEM bytes or 32 raw key bytes; one or a list."""
        if isinstance(sources, TrustedKeys):
            return sources
        if isinstance(sources, (str, bytes, os.PathLike)):
            sources = [sources]
        sources = list(sources)
        if not sources:
            raise ConfigError(
                "trusted_keys is empty: name at least one public key (KEY.pub), or leave trusted_keys out "
                "to load bundles without checking signatures"
            )
        keys = [_public_key(source) for source in sources]
        return cls({key_id(key): key for key in keys})


def _public_key(source: KeySource) -> Any:
    crypto = _crypto()
    name = "the key bytes given"
    if isinstance(source, bytes):
        data = source
    else:
        name = str(source)
        data = _read_key_file(Path(source))
    if len(data) == 32:
        return crypto.asymmetric.ed25519.Ed25519PublicKey.from_public_bytes(data)
    if b"PRIVATE KEY" in data:
        raise ConfigError(
            f"{name} is a private key; trust its public key instead (the KEY.pub that keygen wrote beside it), "
            "and keep the private key where the bundles are signed"
        )
    try:
        key = crypto.serialization.load_pem_public_key(data)
    except (ValueError, TypeError) as error:
        raise ConfigError(
            f"{name} is not a PEM public key ({error}); pass the KEY.pub that `polysense keygen` wrote"
        ) from error
    if not isinstance(key, crypto.asymmetric.ed25519.Ed25519PublicKey):
        raise ConfigError(f"{name} is not an Ed25519 key; make one with `polysense keygen --out KEY`")
    return key


def _read_key_file(path: Path) -> bytes:
    if not path.is_file():
        raise ConfigError(f"key file not found: {path}; make a key pair with `polysense keygen --out KEY`")
    if path.stat().st_size > MAX_KEY_BYTES:
        raise ConfigError(f"{path} is over {MAX_KEY_BYTES:,} bytes: not a key file keygen wrote")
    return path.read_bytes()


def generate_key(out: str | os.PathLike) -> tuple[Path, Path]:
    """A new Ed25519 key pair: the private key at `out` (PEM, mode 0600) and its public key at `out`.pub.
    Never writes over a file. Returns (private, public)."""
    crypto = _crypto()
    serialization = crypto.serialization
    private_path = Path(out)
    public_path = private_path.with_name(private_path.name + ".pub")
    for path in (private_path, public_path):
        if path.exists():
            raise ConfigError(f"{path} exists; choose a new name (a key is never written over)")
    if not private_path.parent.is_dir():
        raise ConfigError(f"--out {out}: the folder {private_path.parent} does not exist; create it first")
    private = crypto.asymmetric.ed25519.Ed25519PrivateKey.generate()
    private_pem = private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    public_pem = private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    _write_new(private_path, private_pem, 0o600)
    _write_new(public_path, public_pem, 0o644)
    return private_path, public_path


def _write_new(path: Path, data: bytes, mode: int) -> None:
    """`data` into the new file `path`, created with `mode` (never readable by others in between)."""
    try:
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    except FileExistsError as error:
        raise ConfigError(f"{path} exists; choose a new name (a key is never written over)") from error
    with os.fdopen(descriptor, "wb") as handle:
        handle.write(data)
    os.chmod(path, mode)  # the umask may have narrowed it; never widens a private key beyond 0600


def load_private_key(path: Path) -> Any:
    """The Ed25519 private key in the PEM file `path` (unencrypted, as keygen writes it)."""
    crypto = _crypto()
    data = _read_key_file(path)
    try:
        key = crypto.serialization.load_pem_private_key(data, password=None)
    except TypeError as error:  # encrypted
        raise ConfigError(
            f"{path} is encrypted; polysense reads unencrypted keys (keygen's, kept at mode 0600)"
        ) from error
    except ValueError as error:
        raise ConfigError(
            f"{path} is not a PEM private key ({error}); pass the KEY (not KEY.pub) that `polysense keygen` wrote"
        ) from error
    if not isinstance(key, crypto.asymmetric.ed25519.Ed25519PrivateKey):
        raise ConfigError(f"{path} is not an Ed25519 key; make one with `polysense keygen --out KEY`")
    return key


def require_signing_key(source: Path, key: str | os.PathLike | None, why: str) -> None:
    """Before a change that writes a new bundle.json for the bundle at `source` (edge, slim): a signed source
    needs `key` to sign the result (ConfigError ending in `why`, which names the fix), and a wrong key fails now,
    not after the change."""
    if key is not None:
        load_private_key(Path(key))
    elif (source / SIGNATURE_FILE).is_file():
        raise ConfigError(f"{source} is signed ({SIGNATURE_FILE}); {why}")


def sign_description(folder: str | os.PathLike, key: str | os.PathLike) -> Path:
    """Write folder/bundle.sig: the signature by the private key at `key` over folder/bundle.json as it is now.
    Returns the signature file's path. The caller checks the bundle first (`open_bundle`): never sign a damaged
    bundle."""
    folder = Path(folder)
    private = load_private_key(Path(key))
    description = (folder / DESCRIPTION_FILE).read_bytes()
    record = {
        "polysense_signature": SIGNATURE_FORMAT,
        "algorithm": ALGORITHM,
        "key_id": key_id(private.public_key()),
        "signed_file": DESCRIPTION_FILE,
        "signed_sha256": hashlib.sha256(description).hexdigest(),
        "signature": base64.b64encode(private.sign(SIGNED_CONTEXT + description)).decode("ascii"),
    }
    target = folder / SIGNATURE_FILE
    partial = folder / f".{SIGNATURE_FILE}.partial"
    partial.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    os.replace(partial, target)
    return target


def verify_description(folder: Path, description: bytes, trusted: TrustedKeys) -> str:
    """Refuse `description` (the bytes of folder/bundle.json, as read) unless folder/bundle.sig is a valid
    signature over them by one of `trusted`. Returns the signing key's id."""
    record = _read_signature(folder)
    key = trusted.keys.get(record["key_id"])
    if key is None:
        raise BundleError(
            f"{folder}: signed by key {record['key_id'][:16]}, which is not one of the trusted keys "
            f"({', '.join(k[:16] for k in trusted.keys)}); trust the signer's public key, or ask for a "
            "bundle signed by a key you trust"
        )
    from cryptography.exceptions import InvalidSignature

    try:
        key.verify(record["signature"], SIGNED_CONTEXT + description)
    except InvalidSignature as error:
        raise BundleError(
            f"{folder}: {SIGNATURE_FILE} does not match {DESCRIPTION_FILE}: the description was changed "
            f"after it was signed; get the bundle again from its signer, or {_SIGN_AGAIN}"
        ) from error
    return str(record["key_id"])


def _read_signature(folder: Path) -> dict:
    path = folder / SIGNATURE_FILE
    _crypto()
    if not path.is_file():
        raise BundleError(
            f"{folder} is not signed (no {SIGNATURE_FILE}) and trusted keys were given; sign it with "
            "`polysense bundle sign BUNDLE --key KEY`, "
            "or load it without trusted keys"
        )
    if path.stat().st_size > MAX_SIGNATURE_BYTES:
        raise BundleError(f"{path} is over {MAX_SIGNATURE_BYTES:,} bytes: not a signature; {_SIGN_AGAIN}")
    try:
        record = json.loads(path.read_bytes().decode("utf-8"))
        if record.get("polysense_signature") != SIGNATURE_FORMAT or record.get("algorithm") != ALGORITHM:
            raise ValueError(f"not a polysense {ALGORITHM} signature (format {SIGNATURE_FORMAT})")
        if record.get("signed_file") != DESCRIPTION_FILE:
            raise ValueError(f"it signs {record.get('signed_file')!r}, not {DESCRIPTION_FILE}")
        if not isinstance(record.get("key_id"), str):
            raise ValueError("key_id is not a string")
        signature = base64.b64decode(str(record["signature"]), validate=True)
        if len(signature) != 64:
            raise ValueError(f"an Ed25519 signature has 64 bytes, this one {len(signature)}")
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError, binascii.Error) as error:
        raise BundleError(f"{path} cannot be read ({error}); {_SIGN_AGAIN}") from error
    return {**record, "signature": signature}
