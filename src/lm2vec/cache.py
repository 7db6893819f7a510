"""What lm2vec keeps on disk between runs: where (``cache_dir``), under which key (``cache_key``; an encoder's own is
:meth:`lm2vec.Encoder.fingerprint`), written how (``atomic_write``: whole or not at all).

Converted GGUF models, int8 weights, ONNX graphs and evaluation embeddings all live under ``cache_dir()``.
"""

from __future__ import annotations

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


def file_stamps(folder: Path, suffixes: tuple[str, ...]) -> list[tuple[str, int, int]]:
    """(name, size, mtime in ns) of the files in ``folder`` with these suffixes: changes when any of them does."""
    files = sorted(p for p in folder.iterdir() if p.suffix in suffixes)
    return [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files]


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
