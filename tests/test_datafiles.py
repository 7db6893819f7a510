"""The JSONL/text readers: every failure names the file and the 1-based line."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from lm2vec.datafiles import data_dir, read_jsonl, read_lines


def write(tmp_path: Path, text: str, name: str = "rows.jsonl") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_reads_objects_and_skips_blank_lines(tmp_path):
    path = write(tmp_path, '{"text": "a", "n": 1}\n\n  \n{"text": "b", "n": 2.5}\n')
    assert read_jsonl(path, {"text": str, "n": (int, float)}) == [{"text": "a", "n": 1}, {"text": "b", "n": 2.5}]


def test_malformed_json_names_file_and_line(tmp_path):
    path = write(tmp_path, '{"text": "a"}\n\n{"text": "b",\n')
    with pytest.raises(ValueError, match=rf"^{re.escape(str(path))}:3: invalid JSON"):
        read_jsonl(path, ["text"])


def test_missing_field_names_file_line_and_field(tmp_path):
    path = write(tmp_path, '{"text": "a"}\n{"txt": "b"}\n')
    with pytest.raises(ValueError, match=rf"^{re.escape(str(path))}:2: missing field\(s\) 'text'"):
        read_jsonl(path, ["text"])


def test_wrong_types_and_non_objects(tmp_path):
    with pytest.raises(ValueError, match=r":1: field 'text' is int, expected str"):
        read_jsonl(write(tmp_path, '{"text": 3}\n'), {"text": str})
    with pytest.raises(ValueError, match=r":2: field 'instruction' is NoneType, expected str"):
        read_jsonl(
            write(tmp_path, '{"text": "a"}\n{"text": "b", "instruction": null}\n'), ["text"], {"instruction": str}
        )
    with pytest.raises(ValueError, match=r":1: expected a JSON object, got list"):
        read_jsonl(write(tmp_path, '["a"]\n'))


def test_a_lone_surrogate_escape_names_file_line_and_field(tmp_path):
    """JSON may escape half of a UTF-16 pair (an emoji cut in two); no tokenizer takes the string Python makes."""
    path = write(tmp_path, '{"text": "fine \\ud83d\\ude00"}\n{"text": "cut \\ud83d"}\n')
    with pytest.raises(
        ValueError, match=r":2: field 'text' is not valid Unicode: a lone surrogate U\+D83D at character 4"
    ):
        read_jsonl(path, {"text": str})


def test_empty_file(tmp_path):
    for text in ("", "\n \n"):
        with pytest.raises(ValueError, match="is empty"):
            read_jsonl(write(tmp_path, text))
        with pytest.raises(ValueError, match="is empty"):
            read_lines(write(tmp_path, text, "rows.txt"))


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl: no such file"):
        read_jsonl(tmp_path / "nope.jsonl")
    with pytest.raises(FileNotFoundError, match="is not a file"):
        read_lines(tmp_path)


def test_bad_utf8_names_the_line(tmp_path):
    path = tmp_path / "rows.txt"
    path.write_bytes(b"fine\n\xff\xfe broken\n")
    with pytest.raises(ValueError, match=r"rows.txt:2: not valid UTF-8"):
        read_lines(path)


def test_read_lines_keeps_text_and_drops_bom(tmp_path):
    path = tmp_path / "rows.txt"
    path.write_bytes("\ufefffirst line\r\n\r\n  second  \n".encode())
    assert read_lines(path) == ["first line", "  second  "]


def test_data_dir_setting(monkeypatch, tmp_path):
    monkeypatch.setenv("LM2VEC_DATA", str(tmp_path))
    assert data_dir() == tmp_path
    monkeypatch.delenv("LM2VEC_DATA")
    monkeypatch.chdir(tmp_path)  # no ../shared/data here: fall back to the repository's sibling
    assert data_dir() == Path(__file__).resolve().parents[2] / "shared" / "data"
