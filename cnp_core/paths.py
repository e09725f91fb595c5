"""User-given paths, checked: canonicalised and kept inside the allowed roots.

Error messages name paths as the user gave them, never the server's absolute paths.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from pathlib import Path

from .errors import CnpError

LISTED = 8  # names shown in an error message before "... and N more"

PathLike = str | Path


def listing(items: Sequence[str], limit: int = LISTED) -> str:
    """'a, b, c' or 'a, b, c, ... and 12 more': long lists stay readable."""
    shown = ", ".join(items[:limit])
    return f"{shown}, ... and {len(items) - limit} more" if len(items) > limit else shown


def resolve_inside(
    given: str,
    allowed_roots: Sequence[PathLike] | None,
    what: str,
    error: type[CnpError],
) -> Path:
    """Canonical path of a user-given file or directory.

    A relative path is looked up under each allowed root (first existing one wins), else
    against the working directory. With ``allowed_roots``, the resolved path (symlinks
    followed) must lie inside one of them; this is checked before existence so that
    nothing is revealed about files elsewhere.
    """
    path = Path(given)
    roots = None if allowed_roots is None else [Path(r).resolve() for r in allowed_roots]
    if roots and not path.is_absolute():
        candidates = [root / path for root in roots]
        path = next((c for c in candidates if c.exists()), candidates[0])
    resolved = path.resolve()
    if roots is not None and not any(resolved.is_relative_to(root) for root in roots):
        raise error(
            f"{what} {given!r} lies outside the allowed roots (symlinks resolved): "
            "place it under one of the server's configured data roots"
        )
    return resolved


def read_secret(path: PathLike, what: str, error: type[Exception]) -> str:
    """The stripped text of a secret file (a bearer token) that only its owner can read.

    As ssh does with private keys, a file that the group or others may read or write is
    refused: the secret may already have leaked, and using it would hide that.
    """
    path = Path(path).expanduser()
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        raise error(
            f"{what} {path} is accessible by others (mode {mode:04o}); "
            f"make it private: chmod 600 {path}"
        )
    return path.read_text().strip()


def file_sha256(path: PathLike) -> str:
    """Hex SHA-256 of a file, read in chunks (weights files can be gigabytes)."""
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def inside(directory: PathLike, relative: str) -> Path:
    """``directory / relative``, checked to resolve inside ``directory`` (symlinks
    followed): the last guard before a job writes a file whose name it was given."""
    base = Path(directory).resolve()
    path = None if "\0" in relative else (base / relative).resolve()  # NUL: no path at all
    if path is None or path == base or not path.is_relative_to(base):
        raise CnpError(f"refusing to write {relative!r}: it leaves the job directory")
    return path


def file_stem(*names: str) -> str:
    """A file name made from names a dataset or request gave (attribute values, layers):
    safe characters only, so never a path (no separator, no ``..``), and a digest of the
    names so that distinct names never share a file."""
    text = "_".join(names)
    safe = re.sub(r"[^A-Za-z0-9_=-]+", "-", text).strip("-")[:80]
    return f"{safe}-{hashlib.sha256(text.encode()).hexdigest()[:8]}"
