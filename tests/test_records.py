"""Record files (jsonl, parquet): reading, path expansion, errors naming file and line, atomic writes."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rloop_lightning.records import (
    RecordError,
    expand_paths,
    iter_located_records,
    iter_records,
    read_records,
    write_jsonl_atomic,
)

RECORDS = [{"prompt": f"p{i}", "completion": f"c{i}"} for i in range(4)]


def write_lines(path, lines: list[str]):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def write_parquet(path, records: list[dict]):
    pq.write_table(pa.Table.from_pylist(records), path)
    return path


def test_jsonl_skips_blank_lines(tmp_path):
    path = write_lines(tmp_path / "a.jsonl", [json.dumps(RECORDS[0]), "", "   ", json.dumps(RECORDS[1])])
    assert list(iter_records(path, ("prompt", "completion"))) == RECORDS[:2]


def test_parquet_records(tmp_path):
    path = write_parquet(tmp_path / "a.parquet", RECORDS)
    assert read_records(path, ("prompt",)) == RECORDS
    assert read_records(str(path)) == RECORDS


def test_directory_reads_every_record_file_in_sorted_order(tmp_path):
    write_parquet(tmp_path / "b.parquet", RECORDS[2:])
    write_lines(tmp_path / "a.jsonl", [json.dumps(r) for r in RECORDS[:2]])
    (tmp_path / "notes.txt").write_text("not records")
    (tmp_path / "nested").mkdir()
    write_lines(tmp_path / "nested" / "c.jsonl", [json.dumps({"prompt": "nested", "completion": "x"})])
    assert [p.name for p in expand_paths(tmp_path)] == ["a.jsonl", "b.parquet", "c.jsonl"]
    assert [r["prompt"] for r in read_records(tmp_path)] == ["p0", "p1", "p2", "p3", "nested"]


def test_glob_and_list_expansion(tmp_path):
    for index in (2, 0, 1):
        write_lines(tmp_path / f"shard-{index}.jsonl", [json.dumps(RECORDS[index])])
    write_lines(tmp_path / "other.jsonl", [json.dumps(RECORDS[3])])
    assert [p.name for p in expand_paths(str(tmp_path / "shard-*.jsonl"))] == [
        "shard-0.jsonl", "shard-1.jsonl", "shard-2.jsonl"]
    assert read_records(str(tmp_path / "shard-*.jsonl")) == RECORDS[:3]
    listed = [tmp_path / "other.jsonl", str(tmp_path / "shard-[01].jsonl")]
    assert read_records(listed) == [RECORDS[3], RECORDS[0], RECORDS[1]]
    assert expand_paths(str(tmp_path / "missing-*.jsonl")) == []


def test_missing_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="record file not found: .*nope.jsonl"):
        expand_paths(tmp_path / "nope.jsonl")


def test_malformed_json_names_file_and_line(tmp_path):
    path = write_lines(tmp_path / "bad.jsonl", [json.dumps(RECORDS[0]), json.dumps(RECORDS[1]), '{"prompt": '])
    records = iter_records(path)
    assert next(records) == RECORDS[0]  # streaming: good lines come before the error
    with pytest.raises(RecordError, match="malformed JSON") as error:
        list(records)
    assert f"{path}:3:" in str(error.value)


def test_missing_field_names_field_file_and_line(tmp_path):
    path = write_lines(tmp_path / "a.jsonl", [json.dumps(RECORDS[0]), "", json.dumps({"prompt": "p"})])
    with pytest.raises(RecordError) as error:
        read_records(path, ("prompt", "completion"))
    message = str(error.value)
    assert f"{path}:3:" in message and "'completion'" in message and "present: ['prompt']" in message


def test_non_object_line_errors(tmp_path):
    path = write_lines(tmp_path / "a.jsonl", ["[1, 2]"])
    with pytest.raises(RecordError, match=r"a\.jsonl:1: expected a JSON object, got list"):
        read_records(path)


def test_missing_parquet_column_names_column_and_file(tmp_path):
    path = write_parquet(tmp_path / "a.parquet", [{"prompt": "p"}])
    with pytest.raises(RecordError) as error:
        read_records(path, ("prompt", "completion"))
    assert str(path) in str(error.value) and "'completion'" in str(error.value)


def test_unknown_suffix_errors(tmp_path):
    path = tmp_path / "records.csv"
    path.write_text("prompt,completion\n")
    with pytest.raises(RecordError, match=r"records\.csv: unsupported record file type '\.csv'"):
        read_records(path)


def test_write_jsonl_atomic_writes_every_record(tmp_path):
    path = tmp_path / "out" / "records.jsonl"  # parent directory is created
    records = [*RECORDS, {"prompt": "héllo ✓", "completion": "line\nbreak"}]
    assert write_jsonl_atomic(path, iter(records)) == 5
    assert read_records(path) == records
    assert "héllo ✓" in path.read_text(encoding="utf-8")  # not ascii-escaped
    assert [p.name for p in path.parent.iterdir()] == ["records.jsonl"]  # no temporary file left


def test_write_jsonl_atomic_keeps_the_old_file_when_writing_fails(tmp_path):
    path = tmp_path / "records.jsonl"
    write_jsonl_atomic(path, RECORDS)
    before = path.read_bytes()

    def failing():
        yield {"prompt": "new0", "completion": "x"}
        yield {"prompt": "new1", "completion": "x"}
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError, match="disk on fire"):
        write_jsonl_atomic(path, failing())
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["records.jsonl"]  # the half-written file is removed


def test_a_byte_that_is_not_utf8_names_file_line_and_byte(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(json.dumps(RECORDS[0]).encode() + b"\n\n" + '{"prompt": "caf\u00e9"}\n'.encode("latin-1"))
    records = iter_records(path)
    assert next(records) == RECORDS[0]
    with pytest.raises(RecordError) as error:
        next(records)
    assert str(error.value).startswith(f"{path}:3: not UTF-8 text (byte 0xe9 at column 16)")


def test_windows_line_ends_and_a_byte_order_mark_are_read(tmp_path):
    path = tmp_path / "windows.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + b"\r\n".join(json.dumps(r).encode() for r in RECORDS[:2]) + b"\r\n")
    assert read_records(path, ("prompt",)) == RECORDS[:2]


def test_located_records_name_the_line_and_the_parquet_row(tmp_path):
    lines = write_lines(tmp_path / "a.jsonl", [json.dumps(RECORDS[0]), "", json.dumps(RECORDS[1])])
    rows = write_parquet(tmp_path / "b.parquet", RECORDS[2:])
    assert list(iter_located_records([lines, rows])) == [
        (f"{lines}:1", RECORDS[0]), (f"{lines}:3", RECORDS[1]), (f"{rows}: row 1", RECORDS[2]),
        (f"{rows}: row 2", RECORDS[3])]
