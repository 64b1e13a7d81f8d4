"""A bundle as one .tar file: written by `polysense edge --tar`, opened by `Pipeline.load` directly.

Opening trusts nothing in the archive: every member must be a regular file with a plain name (no folders,
links, devices, absolute paths or `..`), within a count and a size limit, so no member can land outside the
temporary folder it is unpacked to. Nor can the archive fill the disk: a sparse member (a few KB in the archive
that unpack to gigabytes of holes) is refused, and the bytes written while unpacking are counted and bounded by
the archive's own size on disk (an uncompressed tar stores every byte it unpacks), whatever the headers
declare. The bundle's own checks (hashes, graphs) follow as for a folder. The temporary folder is removed as
soon as the Pipeline has read its files.
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
            budget = min(path.stat().st_size, MAX_ARCHIVE_BYTES)  # what unpacking may write, in all
            for member in _checked_members(path, archive, budget):
                budget -= _unpack(path, archive, member, Path(work) / member.name, budget)
        except (tarfile.TarError, OSError, EOFError) as error:  # truncated or corrupt
            raise BundleError(f"{path} is damaged ({error}); copy it again or make it again") from error
        yield Path(work)


def _unpack(path: Path, archive: tarfile.TarFile, member: tarfile.TarInfo, target: Path, budget: int) -> int:
    """Copy `member` to `target`, refused before writing past `budget` bytes; the bytes written."""
    source = archive.extractfile(member)
    assert source is not None  # _checked_members keeps regular files only, which always extract
    written = 0
    with source, open(target, "xb") as handle:
        while block := source.read(1 << 20):
            written += len(block)
            if written > budget:
                raise BundleError(
                    f"{path}: member {member.name!r} unpacks to more bytes than the archive holds; refused "
                    "(make the archive again with polysense edge --tar)"
                )
            handle.write(block)
    return written


def _checked_members(path: Path, archive: tarfile.TarFile, budget: int) -> list[tarfile.TarInfo]:
    """The members, each checked, before anything is written; `budget`: the bytes they may unpack to in all."""
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
        if member.issparse():
            raise BundleError(
                f"{path}: member {member.name!r} is a sparse file ({member.size:,} bytes unpacked from far "
                "fewer); refused: make the archive again with polysense edge --tar (or tar without --sparse)"
            )
        total += member.size
        if total > MAX_ARCHIVE_BYTES:
            raise BundleError(f"{path}: members over {MAX_ARCHIVE_BYTES >> 30} GB in all; refused")
        if total > budget:
            raise BundleError(
                f"{path}: its members declare {total:,} bytes, more than the archive's {budget:,}; refused "
                "(a damaged or hostile archive: copy it again or make it again with polysense edge --tar)"
            )
        if any(m.name == member.name for m in members):
            raise BundleError(f"{path}: member {member.name!r} appears twice; refused")
        members.append(member)
    return members
