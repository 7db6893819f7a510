"""Where the local datasets live, readers whose errors point at the offending file and line, and the check that a
text is valid Unicode, which every way texts come in applies (files, ``encode``, the server)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

FieldTypes = Mapping[str, type | tuple[type, ...]]


def check_unicode(text: str, what: str) -> None:
    """A ValueError naming ``what`` where ``text`` holds a lone surrogate. JSON's escapes make them (``"\\ud83d"``,
    half of an emoji cut in two by UTF-16 code), Python keeps them, and no UTF-8 tokenizer takes them: caught here,
    the error names the input instead of being the tokenizer's TypeError about the whole batch."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        where = f"a lone surrogate U+{ord(text[err.start]):04X} at character {err.start}"
        raise ValueError(f"{what} is not valid Unicode: {where}") from None


def data_dir() -> Path:
    """``$LM2VEC_DATA``, else ``../shared/data`` from the working directory, else next to the repository.

    The datasets are never part of the project; they sit beside it (see ``shared/data/README.md``).
    """
    if env := os.environ.get("LM2VEC_DATA"):
        return Path(env).expanduser()
    beside_cwd = Path.cwd().parent / "shared" / "data"
    if beside_cwd.is_dir():
        return beside_cwd
    return Path(__file__).resolve().parents[3] / "shared" / "data"


def data_file(root: str | os.PathLike | None, *parts: str) -> Path:
    """``root/parts...`` (``root`` None: :func:`data_dir`), which must exist: else one error that says how to point at
    the datasets."""
    path = Path(root if root is not None else data_dir()).joinpath(*parts)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file (set LM2VEC_DATA or pass data= to point at the datasets)")
    return path


def numbered_lines(path: str | os.PathLike) -> Iterator[tuple[int, str]]:
    """(1-based line number, text) of the non-blank lines; FileNotFoundError/ValueError name the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file" if not path.exists() else f"{path} is not a file")
    seen = False
    for number, raw in enumerate(path.read_bytes().splitlines(), start=1):
        try:
            line = raw.decode("utf-8").removeprefix("\ufeff") if number == 1 else raw.decode("utf-8")
        except UnicodeDecodeError as err:
            raise ValueError(f"{path}:{number}: not valid UTF-8 ({err.reason} at byte {err.start})") from None
        if line.strip():
            seen = True
            yield number, line
    if not seen:
        raise ValueError(f"{path} is empty")


def read_lines(path: str | os.PathLike) -> list[str]:
    """The non-blank lines of a UTF-8 text file, one text per line."""
    return [line for _, line in numbered_lines(path)]


def first_record(path: str | os.PathLike) -> dict:
    """The first non-blank line's object, read without the rest of the file; {} where it is none (the full read
    names the line and what is wrong)."""
    with open(path, encoding="utf-8-sig", errors="replace") as lines:
        for line in lines:
            if line.strip():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    return {}
                return record if isinstance(record, dict) else {}
    return {}


def read_jsonl(
    path: str | os.PathLike, required_fields: Iterable[str] | FieldTypes = (), optional_fields: FieldTypes | None = None
) -> list[dict]:
    """Read a JSON-lines file of objects (blank lines skipped), checking fields as it goes.

    ``required_fields`` is a list of names, or a mapping of name to the accepted type(s); ``optional_fields``
    maps names to types checked only where present. Errors say ``file:line: what is wrong``.
    """
    types = dict(required_fields) if isinstance(required_fields, Mapping) else dict.fromkeys(required_fields)
    checks = types | dict(optional_fields or {})
    records = []
    for number, line in numbered_lines(path):
        where = f"{path}:{number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{where}: invalid JSON ({err.msg} at column {err.colno})") from None
        if not isinstance(record, dict):
            raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
        missing = [name for name in types if name not in record]
        if missing:
            raise ValueError(f"{where}: missing field(s) {', '.join(map(repr, missing))} (has {sorted(record)})")
        for name, expected in checks.items():
            if expected is not None and name in record and not isinstance(record[name], expected):
                names = " or ".join(t.__name__ for t in (expected if isinstance(expected, tuple) else (expected,)))
                raise ValueError(f"{where}: field {name!r} is {type(record[name]).__name__}, expected {names}")
            if isinstance(record.get(name), str):
                check_unicode(record[name], f"{where}: field {name!r}")
        records.append(record)
    return records
