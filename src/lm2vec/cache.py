"""What lm2vec keeps on disk between runs: where (``cache_dir``), under which key (``cache_key``; an encoder's own is
:meth:`lm2vec.Encoder.fingerprint`; a file's: ``file_digest``), written how (``atomic_write``: whole or not at all).

Converted GGUF models, int8 weights, ONNX graphs and evaluation embeddings all live under ``cache_dir()``, one
folder a kind; ``cache_entries`` lists them with their sizes and last use, ``prune`` removes what has not been used
for a while (``lm2vec cache``): nothing is evicted by itself, and a new version of a cache's key leaves the old
entries behind.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from stat import S_ISDIR, S_ISREG


def cache_dir() -> Path:
    """``$LM2VEC_CACHE``, else ``~/.cache/lm2vec``."""
    return Path(os.environ.get("LM2VEC_CACHE", Path.home() / ".cache" / "lm2vec"))


def cache_key(*parts: object) -> str:
    """A SHA-256 hex digest of ``parts`` (anything JSON can write; other objects by ``str``)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def file_digest(path: Path) -> str:
    """The SHA-256 of a file's bytes, read whole once per place, size and time (remembered under ``cache_dir()``).

    Caches keyed by it follow the content: a copy, a move or a reinstall of the same file finds them, where a key of
    its path and time would convert or calibrate again (a 7B GGUF file: another 28 GB float32 conversion).
    """
    stat = path.stat()
    memo = cache_dir() / "digests" / cache_key(str(path.resolve()), stat.st_size, stat.st_mtime_ns)[:32]
    with contextlib.suppress(OSError):
        digest = memo.read_text().strip()
        if len(digest) == 64:
            return digest
    with path.open("rb") as file:
        digest = hashlib.file_digest(file, "sha256").hexdigest()
    with contextlib.suppress(OSError):  # a read-only cache: read whole again next time
        atomic_write(memo, digest + "\n")
    return digest


def folder_digests(folder: Path, suffixes: tuple[str, ...]) -> list[tuple[str, str]]:
    """(name, :func:`file_digest`) of the files in ``folder`` with these suffixes: changes when any of them does."""
    return [(p.name, file_digest(p)) for p in sorted(folder.iterdir()) if p.suffix in suffixes]


def atomic_write(path: Path, write: Callable[[Path], object] | str, *, directory: bool = False) -> Path:
    """Create the file (or, with ``directory``, the folder) ``path`` whole or not at all.

    ``write`` fills a temporary file or folder beside ``path`` (or is the text of the file), which is then renamed
    into place, so a crash never leaves half a cache for a later run to trust. A file replaces an older one; a
    folder that appeared meanwhile (another process finished first) is kept and this one dropped.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    if directory:
        tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}."))
    else:
        fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial")
        os.close(fd)
        tmp = Path(name)
    try:
        tmp.chmod(0o755 if directory else 0o644)  # mkstemp/mkdtemp make private ones: caches are shared like files
        if isinstance(write, str):
            tmp.write_text(write)
        else:
            write(tmp)
        if not (directory and path.exists()):
            os.replace(tmp, path)
    finally:
        if directory:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
    return path


@dataclass(frozen=True)
class CacheEntry:
    """A file or folder directly inside one of the cache's folders (its ``kind``: gguf, lower, calibration, ...)."""

    path: Path
    kind: str
    size: int  # bytes, of every file inside
    last_used: float  # seconds since the epoch: the newest read or change of it or anything inside


def mark_used(path: Path) -> None:
    """Note that a cache entry was used now, so :func:`prune` keeps it (file systems mounted ``noatime`` do not note
    reads); a read-only cache is left as it is."""
    with contextlib.suppress(OSError):
        os.utime(path)


def cache_entries(root: Path | None = None) -> list[CacheEntry]:
    """Every entry under ``root`` (default :func:`cache_dir`), least recently used first."""
    root = root or cache_dir()
    kinds = sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    entries = []
    for kind in kinds:
        for path in kind.iterdir():
            with contextlib.suppress(FileNotFoundError):  # gone meanwhile: an atomic write's temporary, a prune
                entries.append(_entry(path, kind.name))
    return sorted(entries, key=lambda e: e.last_used)


def _entry(path: Path, kind: str) -> CacheEntry:
    top = path.lstat()
    stats = [top] + ([p.lstat() for p in path.rglob("*")] if S_ISDIR(top.st_mode) else [])
    size = sum(s.st_size for s in stats if S_ISREG(s.st_mode))
    # a folder's own access time moves whenever it is listed (this listing too): its files' reads count, not that
    used = max(s.st_mtime if S_ISDIR(s.st_mode) else max(s.st_atime, s.st_mtime) for s in stats)
    return CacheEntry(path, kind, size, used)


def prune(unused_days: float, root: Path | None = None, dry_run: bool = False) -> list[CacheEntry]:
    """Remove the entries not used for ``unused_days`` days (0: all of them); return them. A running process keeps
    what it has open or mapped (a removed file lives on until it is closed); a later load rebuilds what it needs."""
    cutoff = time.time() - unused_days * 86400
    removed = [e for e in cache_entries(root) if e.last_used <= cutoff]
    for entry in [] if dry_run else removed:
        if entry.path.is_dir() and not entry.path.is_symlink():
            shutil.rmtree(entry.path, ignore_errors=True)
        else:
            entry.path.unlink(missing_ok=True)  # gone meanwhile: nothing to do
    return removed
