"""Claims about corpus.read_jsonl, the one JSONL reader of every stage: each kind of bad line (invalid UTF-8, broken
or too deeply nested JSON, not an object, a lone surrogate, over the length limit) is counted by reason with its
file:line and skipped while every good record is kept in order; a surrogate pair is good; our own files' last line
cut by a kill is no record; without counts, what was skipped is printed."""

import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import corpus  # noqa: E402


def test_bad_lines_are_counted_with_their_place_and_good_records_kept(tmp_path, capsys):
    path = tmp_path / "x.jsonl"
    good = [{"i": 0}, {"i": 1, "emoji": "\U0001F600"}, {"i": 2}, {"i": 3}]
    lines = [json.dumps(good[0]).encode(), b"{broken", b'{"a": "\xff\xfe"}', b"[" * 100_000,
             json.dumps(good[1]).encode(),  # "\ud83d\ude00": an escaped surrogate pair, one character
             b'"a string"', b'{"t": "lone \\ud800"}', b"", json.dumps(good[2]).encode(),
             b'{"t": "' + b"x" * 300_000 + b'"}', json.dumps(good[3]).encode()]
    path.write_bytes(b"\n".join(lines) + b"\n")
    counts = corpus.new_counts()
    assert corpus.read_jsonl(str(path), counts, max_line_bytes=200_000) == good
    assert counts["bad_records"] == {"broken_json": 1, "invalid_utf8": 1, "nested_too_deep": 1, "not_an_object": 1,
                                     "lone_surrogate": 1, "line_too_long": 1}
    at = {reason: places[0] for reason, places in counts["bad_examples"].items()}
    assert at == {"broken_json": f"{path}:2", "invalid_utf8": f"{path}:3", "nested_too_deep": f"{path}:4",
                  "not_an_object": f"{path}:6", "lone_surrogate": f"{path}:7", "line_too_long": f"{path}:10"}
    assert [n for n, _ in corpus.read_jsonl(str(path), numbered=True, max_line_bytes=200_000)] == [1, 5, 9, 11]
    assert f"{path}:2" in capsys.readouterr().err  # without counts: printed, not silent


def test_own_files_ignore_a_last_line_cut_by_a_kill(tmp_path):
    path = tmp_path / "own.jsonl"
    path.write_text('{"i": 0}\n{"i": 1}\n{"i": 2, "cut')
    assert corpus.read_jsonl(str(path), complete_only=True) == [{"i": 0}, {"i": 1}]
    with corpus.append_jsonl(str(path)) as f:  # the cut line goes before the next record is appended
        f.write(json.dumps({"i": 2}) + "\n")
    assert corpus.read_jsonl(str(path), complete_only=True) == [{"i": 0}, {"i": 1}, {"i": 2}]
    assert corpus.read_jsonl(str(tmp_path / "missing.jsonl")) == []
