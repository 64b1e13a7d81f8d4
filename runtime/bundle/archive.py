"""A bundle as one .tar file: written by `polysense edge --tar`, opened by `Pipeline.load` directly.

Opening trusts nothing in the archive: every member must be a regular file with a plain name (no folders,
links, devices, absolute paths or `..`), within a count and a size limit, so no member can land outside the
temporary folder it is unpacked to or fill the disk. The bundle's own checks (hashes, graphs) follow as for a
folder. The temporary folder is removed as soon as the Pipeline has read its files.
"""

from __future__ import annotations

import contextlib
import os
import re
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path

from polysense.errors import BundleError

MAX_MEMBERS = 64
MAX_ARCHIVE_BYTES = 8 << 30
PLAIN_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")


def is_archive(path: str | os.PathLike) -> bool:
    return Path(path).suffix.lower() == ".tar" and Path(path).is_file()


def write_archive(folder: Path, target: Path) -> None:
    """Every file of `folder` (flat) into the uncompressed tar `target`, written beside and renamed."""
    partial = target.with_name(f".{target.name}.partial")
    with tarfile.open(partial, "w", format=tarfile.PAX_FORMAT) as archive:
        for file in sorted(folder.iterdir()):
            archive.add(file, arcname=file.name, recursive=False)
    os.replace(partial, target)


@contextlib.contextmanager
def unpacked(path: str | os.PathLike) -> Iterator[Path]:
    """The archive's files in a temporary folder, for as long as the context lasts."""
    path = Path(path)
    try:
        archive = tarfile.open(path, "r:")  # noqa: SIM115 (closed by the with below)
    except (tarfile.TarError, OSError) as error:
        raise BundleError(
            f"{path} is not a readable .tar archive ({error}); make it again with polysense edge --tar"
        ) from error
    with archive, tempfile.TemporaryDirectory(prefix="polysense-bundle-") as work:
        try:
            for member in _checked_members(path, archive):
                source = archive.extractfile(member)
                assert source is not None  # _checked_members keeps regular files only, which always extract
                with source, open(Path(work) / member.name, "xb") as target:
                    while block := source.read(1 << 20):
                        target.write(block)
        except (tarfile.TarError, OSError, EOFError) as error:  # truncated or corrupt
            raise BundleError(f"{path} is damaged ({error}); copy it again or make it again") from error
        yield Path(work)


def _checked_members(path: Path, archive: tarfile.TarFile) -> list[tarfile.TarInfo]:
    members: list[tarfile.TarInfo] = []
    total = 0
    for member in archive:
        if len(members) >= MAX_MEMBERS:
            raise BundleError(f"{path}: more than {MAX_MEMBERS} members; a bundle holds a handful of files")
        if not member.isreg():
            raise BundleError(
                f"{path}: member {member.name!r} is not a regular file (a link or folder); refused"
            )
        if not PLAIN_NAME.fullmatch(member.name):
            raise BundleError(f"{path}: member name {member.name!r} is not a plain file name; refused")
        total += member.size
        if total > MAX_ARCHIVE_BYTES:
            raise BundleError(f"{path}: members over {MAX_ARCHIVE_BYTES >> 30} GB in all; refused")
        if any(m.name == member.name for m in members):
            raise BundleError(f"{path}: member {member.name!r} appears twice; refused")
        members.append(member)
    return members
