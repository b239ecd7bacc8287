"""Reading and writing record files (jsonl or parquet) with errors that name the file and row.

Every on-disk dataset of the project (expert shards, local task files, RFT demonstrations) goes
through here, so a malformed line or a missing field always reads ``path:line: ...``.
"""

from __future__ import annotations

import glob
import json
import os
from pathlib import Path
from typing import Iterable, Iterator, Sequence


class RecordError(ValueError):
    """A record file is malformed; the message names the file and the line/row."""


def expand_paths(paths: str | os.PathLike | Sequence[str | os.PathLike]) -> list[Path]:
    """Expand files, directories (all ``*.jsonl``/``*.parquet`` inside) and globs, sorted."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    found: list[Path] = []
    for entry in paths:
        entry = str(entry)
        if os.path.isdir(entry):
            matches = sorted(
                p for p in Path(entry).rglob("*") if p.suffix in (".jsonl", ".parquet") and p.is_file()
            )
        elif any(ch in entry for ch in "*?["):
            matches = sorted(Path(p) for p in glob.glob(entry, recursive=True))
        else:
            if not os.path.exists(entry):
                raise FileNotFoundError(f"record file not found: {entry}")
            matches = [Path(entry)]
        found.extend(matches)
    return found


def _check_fields(record: object, required: Iterable[str], where: str, text: Iterable[str] = ()) -> dict:
    if not isinstance(record, dict):
        raise RecordError(f"{where}: expected a JSON object, got {type(record).__name__}")
    missing = [field for field in required if field not in record]
    if missing:
        raise RecordError(f"{where}: missing field(s) {missing}; present: {sorted(record)}")
    for field in text:
        if field in record and not isinstance(record[field], str):
            raise RecordError(f"{where}: field {field!r} is {type(record[field]).__name__} "
                              f"({str(record[field])[:60]!r}), expected text")
    return record


def decode_line(raw: bytes, where: str) -> str:
    """A line of a record file as text; ``RecordError`` naming the line and the byte when it is not UTF-8."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise RecordError(
            f"{where}: not UTF-8 text (byte 0x{raw[error.start]:02x} at column {error.start + 1}); "
            "record files must be UTF-8, e.g. iconv -f latin1 -t utf-8") from None


def iter_jsonl(path: Path, required: Iterable[str] = (), text: Iterable[str] = ()) -> Iterator[dict]:
    for _, record in _located_jsonl(path, required, text):
        yield record


def _located_jsonl(path: Path, required: Iterable[str], text: Iterable[str]) -> Iterator[tuple[str, dict]]:
    required, text = tuple(required), tuple(text)
    with open(path, "rb") as handle:
        for line_number, raw in enumerate(handle, start=1):
            if line_number == 1:
                raw = raw.removeprefix(b"\xef\xbb\xbf")  # a UTF-8 byte order mark
            line = decode_line(raw, f"{path}:{line_number}")
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise RecordError(f"{path}:{line_number}: malformed JSON ({error.msg})") from None
            where = f"{path}:{line_number}"
            yield where, _check_fields(record, required, where, text)


def iter_parquet(path: Path, required: Iterable[str] = (), text: Iterable[str] = ()) -> Iterator[dict]:
    for _, record in _located_parquet(path, required, text):
        yield record


def _located_parquet(path: Path, required: Iterable[str], text: Iterable[str]) -> Iterator[tuple[str, dict]]:
    import pyarrow
    import pyarrow.parquet as pq

    required, text = tuple(required), tuple(text)
    try:
        parquet = pq.ParquetFile(path)
    except (pyarrow.ArrowException, OSError) as error:
        raise RecordError(f"{path}: not a readable parquet file ({error})") from None
    missing = [field for field in required if field not in parquet.schema_arrow.names]
    if missing:
        raise RecordError(f"{path}: missing column(s) {missing}; present: {parquet.schema_arrow.names}")
    row = 0
    batches = parquet.iter_batches()
    while True:
        try:
            batch = next(batches, None)
        except (pyarrow.ArrowException, OSError) as error:
            raise RecordError(f"{path}: unreadable after row {row} (a corrupt or truncated parquet file: "
                              f"{error})") from None
        if batch is None:
            return
        for record in batch.to_pylist():
            row += 1
            where = f"{path}: row {row}"
            yield where, _check_fields(record, required, where, text)


def iter_records(paths, required: Iterable[str] = (), text: Iterable[str] = ()) -> Iterator[dict]:
    """Yield records from jsonl/parquet files in order, validating ``required`` fields, and that the
    ``text`` fields hold strings (a number, list, bool or null there names the file and row)."""
    for _, record in iter_located_records(paths, required, text):
        yield record


def iter_located_records(paths, required: Iterable[str] = (), text: Iterable[str] = ()) -> Iterator[tuple[str, dict]]:
    """``iter_records`` with where each record came from: ``(where, record)``, ``where`` naming the file and
    line (``path:3``) or parquet row (``path: row 3``) as the errors do."""
    for path in expand_paths(paths):
        if path.suffix == ".parquet":
            yield from _located_parquet(path, required, text)
        elif path.suffix in (".jsonl", ".json"):
            yield from _located_jsonl(path, required, text)
        else:
            raise RecordError(f"{path}: unsupported record file type {path.suffix!r} (use .jsonl or .parquet)")


def read_records(paths, required: Iterable[str] = (), text: Iterable[str] = ()) -> list[dict]:
    return list(iter_records(paths, required, text))


def _temporary_path(path: Path) -> Path:
    """Where this process writes ``path`` before the atomic rename: ``.{name}.tmp-{pid}`` beside it."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def remove_temporaries(directory: Path, pattern: str) -> None:
    """Delete the temporary files that a process killed inside an atomic write (SIGKILL, OOM) left in
    ``directory`` for files matching ``pattern``. Call it only where no other process writes them."""
    for temporary in Path(directory).glob(f".{pattern}.tmp-*"):
        temporary.unlink(missing_ok=True)


def write_jsonl_atomic(path: str | os.PathLike, records: Iterable[dict]) -> int:
    """Write ``records`` to ``path`` via a temporary file and an atomic rename; returns the count.

    A crash mid-write leaves either the old file or none, never a truncated line.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = _temporary_path(path)
    count = 0
    try:
        with open(temporary, "w", encoding="utf-8") as handle:
            for record in records:
                handle.write(json.dumps(record, ensure_ascii=False) + "\n")
                count += 1
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)  # no stray half-file for a later glob to pick up
        raise
    return count


def write_json_atomic(path: str | os.PathLike, data) -> None:
    """Write ``data`` as JSON to ``path`` via a temporary file and an atomic rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = _temporary_path(path)
    temporary.write_text(json.dumps(data, indent=1, sort_keys=True))
    os.replace(temporary, path)
