"""Per-image detections as JSON Lines, appended while a long job runs, so that a crash loses one image at most.

`maskrcnn predict` and `maskrcnn eval` write OUT/predictions.jsonl: one line per finished image, a
JSON object with the image's key (predict: `file_name` and `image_id`; eval: `image_id`) and its
COCO `detections`. Each line is flushed and fsynced before the next image starts. `--resume` reads
the file back and skips those images (a last line cut short by a crash is dropped, with a note);
predictions.json is assembled from the lines at the end, through a temporary file and a rename.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

from maskrcnn.errors import UserError
from maskrcnn.fileio import atomic_path


@dataclass
class LogEntry:
    """One image's line: its key fields (the record without detections), detection count, byte offset."""

    key: dict[str, Any]
    num_detections: int
    offset: int


class DetectionsLog:
    """An append-only JSON Lines file of per-image detection records.

    `resume=False` starts the file over; `resume=True` keeps its complete lines (listed in `entries`)
    and appends after them. Every record must hold `key_fields` and a `detections` list.
    """

    def __init__(self, path: str | os.PathLike, key_fields: tuple[str, ...], resume: bool = False) -> None:
        self.path = Path(path)
        self.key_fields = key_fields
        self.entries: list[LogEntry] = []
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume and self.path.exists():
            self.entries, end = self._scan()
            # Cut a partial last line off, so that the next record starts on a line of its own.
            os.truncate(self.path, end)
            self._file = open(self.path, "ab")
        else:
            self._file = open(self.path, "wb")

    def _scan(self) -> tuple[list[LogEntry], int]:
        """Return the complete lines' entries and the byte length they span.

        Only the last line may be bad (a write cut short by a kill or a crash): it is dropped with a
        one-line note. A bad line before the last means the file is not one this job wrote.
        """
        entries: list[LogEntry] = []
        offset = 0
        dropped: int | None = None  # number of a bad line, allowed only as the last one
        with open(self.path, "rb") as f:
            for number, line in enumerate(f, start=1):
                if dropped is not None:
                    raise UserError(f"'{self.path}' line {dropped} is not a complete record; remove that line "
                                    "(or the file, to start over) and run again")
                record = _parse(line)
                if record is None:
                    dropped = number
                    continue
                missing = [k for k in (*self.key_fields, "detections") if k not in record]
                if missing:
                    raise UserError(f"'{self.path}' line {number} has no '{missing[0]}'; it is not a detections "
                                    "log this command wrote: remove it, or choose another --out")
                key = {k: record[k] for k in self.key_fields}
                entries.append(LogEntry(key, len(record["detections"]), offset))
                offset += len(line)
        if dropped is not None:
            print(f"note: dropped the incomplete last line of '{self.path}' (cut short when the run stopped); "
                  "that image runs again", file=sys.stderr)
        return entries, offset

    def append(self, record: dict[str, Any]) -> None:
        """Write one image's record as a line and force it to disk before returning."""
        line = (json.dumps(record) + "\n").encode("utf-8")
        offset = self._file.tell()
        self._file.write(line)
        self._file.flush()
        os.fsync(self._file.fileno())
        key = {k: record[k] for k in self.key_fields}
        self.entries.append(LogEntry(key, len(record["detections"]), offset))

    def read(self, entries: Iterable[LogEntry]) -> Iterator[dict[str, Any]]:
        """Yield the full records of `entries`, in the order given (one line in memory at a time)."""
        with open(self.path, "rb") as f:
            for entry in entries:
                f.seek(entry.offset)
                yield json.loads(f.readline())

    def close(self) -> None:
        """Close the file (everything written is already on disk)."""
        self._file.close()

    def __enter__(self) -> "DetectionsLog":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _parse(line: bytes) -> dict[str, Any] | None:
    """Return the JSON object on a complete line, or None for a partial or garbled one."""
    if not line.endswith(b"\n"):
        return None  # the write of this line never finished
    try:
        record = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    return record if isinstance(record, dict) else None


def write_results_json(path: Path, per_image: Iterable[list[dict]]) -> None:
    """Write COCO results (one JSON list) from per-image detection lists, streaming, atomically.

    The bytes equal `json.dumps` of the concatenated list, so a file assembled from the log reads
    exactly like one written in one go.
    """
    with atomic_path(path) as tmp:
        with open(tmp, "w") as f:
            f.write("[")
            separator = ""
            for detections in per_image:
                for detection in detections:
                    f.write(separator + json.dumps(detection))
                    separator = ", "
            f.write("]")
            f.flush()
            os.fsync(f.fileno())

