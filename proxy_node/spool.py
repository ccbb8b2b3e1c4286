"""The exporter's disk spool: a bounded, crash-tolerant FIFO of serialized batches.

Records live in numbered segment files, each record framed as a 4-byte length, a 4-byte
CRC32 and the payload. Reading and acknowledging are separate cursors: a record is read
when it is sent and acknowledged when the collector has committed it; a segment file is
deleted once every record in it is acknowledged. After a crash, everything not yet
acknowledged is read again (the collector drops duplicates by event id); a torn record at
the end of the last segment is cut off.

Not thread-safe: the exporter calls it from one worker thread only, so the event loop never
waits on the disk.
"""

from __future__ import annotations

import os
import struct
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

__all__ = ["FsyncPolicy", "Spool", "SpoolPosition"]

FsyncPolicy = Literal["always", "interval", "never"]
_HEADER = struct.Struct("!II")
_SUFFIX = ".seg"


@dataclass(frozen=True, slots=True)
class SpoolPosition:
    """Where a record ends: acknowledging it acknowledges everything before it too."""

    segment: int
    offset: int


class Spool:
    """A FIFO of byte records on disk, bounded in total size."""

    def __init__(
        self,
        directory: Path,
        *,
        max_bytes: int,
        segment_bytes: int = 4 * 1024 * 1024,
        fsync: FsyncPolicy = "interval",
        fsync_interval: float = 1.0,
    ) -> None:
        self.directory = directory
        self.max_bytes = max_bytes
        self.segment_bytes = segment_bytes
        self.fsync = fsync
        self.fsync_interval = fsync_interval
        self.recovered_torn = 0
        directory.mkdir(parents=True, exist_ok=True)
        self._sizes: dict[int, int] = {}
        for path in sorted(directory.glob(f"*{_SUFFIX}")):
            number = int(path.stem)
            self._sizes[number] = self._recover(path)
        if not self._sizes:
            self._sizes[1] = 0
        self._total = sum(self._sizes.values())
        self._write_segment = max(self._sizes)
        self._writer = open(self._path(self._write_segment), "ab")  # noqa: SIM115
        self._read = SpoolPosition(min(self._sizes), 0)
        self._reader: tuple[int, object] | None = None
        self._last_sync = time.monotonic()
        self._dirty = False

    def _path(self, segment: int) -> Path:
        return self.directory / f"{segment:020d}{_SUFFIX}"

    def _recover(self, path: Path) -> int:
        """The length of the segment's valid prefix; a torn tail is truncated."""
        valid = 0
        with open(path, "rb") as handle:
            while True:
                header = handle.read(_HEADER.size)
                if len(header) < _HEADER.size:
                    break
                length, crc = _HEADER.unpack(header)
                payload = handle.read(length)
                if len(payload) < length or zlib.crc32(payload) != crc:
                    break
                valid += _HEADER.size + length
        if valid != path.stat().st_size:
            self.recovered_torn += 1
            with open(path, "r+b") as handle:
                handle.truncate(valid)
        return valid

    @property
    def size(self) -> int:
        """Bytes on disk, acknowledged or not (what the bound applies to); an int read is
        safe from other threads."""
        return self._total

    def has_unread(self) -> bool:
        """Whether a record is waiting to be read."""
        segment, offset = self._read.segment, self._read.offset
        return offset < self._sizes.get(segment, 0) or segment < self._write_segment

    def append(self, payload: bytes) -> bool:
        """Store a record at the end; False (and nothing written) when the spool is full."""
        record = _HEADER.pack(len(payload), zlib.crc32(payload)) + payload
        if self.size + len(record) > self.max_bytes:
            return False
        if self._sizes[self._write_segment] >= self.segment_bytes:
            self._rotate()
        self._writer.write(record)
        self._writer.flush()
        self._sizes[self._write_segment] += len(record)
        self._total += len(record)
        self._dirty = True
        if self.fsync == "always" or (
            self.fsync == "interval" and time.monotonic() - self._last_sync >= self.fsync_interval
        ):
            self.sync()
        return True

    def sync(self) -> None:
        """fsync the segment being written (when anything changed since the last sync)."""
        if self._dirty and self.fsync != "never":
            os.fsync(self._writer.fileno())
        self._dirty = False
        self._last_sync = time.monotonic()

    def _rotate(self) -> None:
        self.sync()
        self._writer.close()
        self._write_segment += 1
        self._sizes[self._write_segment] = 0
        self._writer = open(self._path(self._write_segment), "ab")  # noqa: SIM115

    def read_next(self) -> tuple[SpoolPosition, bytes] | None:
        """The next unread record and where it ends, or None."""
        while True:
            segment, offset = self._read.segment, self._read.offset
            if offset < self._sizes.get(segment, 0):
                break
            if segment >= self._write_segment:
                return None
            self._read = SpoolPosition(segment + 1, 0)
        with open(self._path(segment), "rb") as handle:
            handle.seek(offset)
            length, _crc = _HEADER.unpack(handle.read(_HEADER.size))
            payload = handle.read(length)
        end = SpoolPosition(segment, offset + _HEADER.size + length)
        self._read = end
        return end, payload

    def ack(self, position: SpoolPosition) -> None:
        """Everything up to `position` is committed: delete segments no longer needed."""
        for segment in sorted(self._sizes):
            if segment >= position.segment:
                break
            self._delete(segment)
        if (
            position.segment == self._write_segment
            and position.offset >= self._sizes[self._write_segment]
            and self._read.segment == self._write_segment
            and self._read.offset >= self._sizes[self._write_segment]
        ):
            # Everything written is committed: start afresh instead of growing forever.
            self._writer.close()
            self._delete(self._write_segment)
            self._write_segment += 1
            self._sizes[self._write_segment] = 0
            self._writer = open(self._path(self._write_segment), "ab")  # noqa: SIM115
            self._read = SpoolPosition(self._write_segment, 0)

    def _delete(self, segment: int) -> None:
        self._total -= self._sizes.pop(segment, 0)
        try:
            self._path(segment).unlink()
        except FileNotFoundError:
            pass

    def close(self) -> None:
        """Flush to disk and close."""
        self.sync()
        self._writer.close()
