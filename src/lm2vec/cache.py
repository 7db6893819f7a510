"""What lm2vec keeps on disk between runs: where (``cache_dir``), under which key (``cache_key``; an encoder's own is
:meth:`lm2vec.Encoder.fingerprint`; a file's: ``file_digest``), written how (``atomic_write``: whole or not at all).

Converted GGUF models, int8 weights, ONNX graphs and evaluation embeddings all live under ``cache_dir()``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path


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
