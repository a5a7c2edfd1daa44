"""Per-image rows streamed to disk during the pass, so memory stays flat however large the folder is.

Two kinds of stream: `RowStore` (numpy memmaps, one per field, sized for the whole folder; rows past the last image
are never written, so the files stay sparse) and `CsvStream` (a CSV written row by row). Both can describe
themselves as a `StreamRef` inside an analysis's state, and `absorb` a ref: reopening it in place when it is this
run's own stream (resume after a crash: rows past the checkpoint are dropped) or copying its rows after the current
ones when it is another run's (merging shards, in shard order, so rows end in the sorted order of the folder).
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

COPY_ROWS = 65536  # rows copied at a time when absorbing another store (bounded memory)


@dataclass
class StreamRef:
    """Where a stream's rows are and how many belong to the saved state: `location` is the store folder or the
    CSV file, `count` the rows, `size` the bytes of the paths file or CSV that hold exactly those rows."""

    location: str
    count: int
    size: int


class RowStore:
    def __init__(self, folder: Path, capacity: int, fields: Dict[str, Tuple[Tuple[int, ...], Any]],
                 _reopen_count: Optional[int] = None, _paths_size: int = 0):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.capacity = max(1, int(capacity))
        mode = "w+" if _reopen_count is None else "r+"
        self.count = _reopen_count or 0
        self.arrays = {}
        for name, spec in fields.items():
            if mode == "w+":
                shape, dtype = spec
                self.arrays[name] = np.lib.format.open_memmap(self.folder / f"{name}.npy", mode="w+", dtype=dtype,
                                                              shape=(self.capacity, *shape))
            else:
                self.arrays[name] = np.load(self.folder / f"{name}.npy", mmap_mode="r+")
        paths_file = self.folder / "paths.jsonl"
        if mode == "w+":
            self._paths = open(paths_file, "w", encoding="utf-8")
        else:
            with open(paths_file, "r+b") as handle:
                handle.truncate(_paths_size)  # lines written after the checkpoint belong to rows being redone
            self._paths = open(paths_file, "a", encoding="utf-8")

    @classmethod
    def reopen(cls, ref: StreamRef) -> "RowStore":
        """This run's own store after a restart, holding exactly the `ref.count` rows of the saved state."""
        folder = Path(ref.location)
        fields = {p.stem: None for p in sorted(folder.glob("*.npy"))}
        first = np.load(folder / f"{next(iter(fields))}.npy", mmap_mode="r")
        return cls(folder, len(first), fields, _reopen_count=ref.count, _paths_size=ref.size)

    def append(self, paths: Sequence[str], **rows: np.ndarray) -> None:
        """Write one batch: `paths` (B,) and, for every field, an array of shape (B, *field shape)."""
        end = self.count + len(paths)
        if end > self.capacity:
            raise ValueError(f"RowStore sized for {self.capacity} rows received {end}")
        for name, array in self.arrays.items():
            array[self.count:end] = rows[name]
        for path in paths:
            self._paths.write(json.dumps(path) + "\n")
        self.count = end

    def ref(self) -> StreamRef:
        """Flush to disk and describe the rows written so far (for checkpoints and shard states)."""
        for array in self.arrays.values():
            array.flush()
        self._paths.flush()
        return StreamRef(str(self.folder), self.count, self._paths.buffer.tell())

    def absorb(self, ref: StreamRef) -> None:
        """Append the rows of another run's store (`ref`) after this store's rows, in order."""
        folder = Path(ref.location)
        with open(folder / "paths.jsonl", encoding="utf-8") as handle:
            paths = [json.loads(line) for _, line in zip(range(ref.count), handle)]
        sources = {name: np.load(folder / f"{name}.npy", mmap_mode="r") for name in self.arrays}
        for first in range(0, ref.count, COPY_ROWS):
            last = min(first + COPY_ROWS, ref.count)
            self.append(paths[first:last], **{name: source[first:last] for name, source in sources.items()})

    def pack(self, out_path: Path, **extra: Any) -> None:
        """Write `paths` and every field (first `count` rows) plus `extra` arrays to one .npz, then clean up."""
        self._paths.close()
        with open(self.folder / "paths.jsonl", encoding="utf-8") as handle:
            paths: List[str] = [json.loads(line) for line in handle]
        data = {name: array[: self.count] for name, array in self.arrays.items()}
        tmp = Path(out_path).with_name(Path(out_path).name + ".tmp.npz")
        np.savez_compressed(tmp, paths=np.array(paths, dtype=str), **data, **extra)
        os.replace(tmp, out_path)
        for array in self.arrays.values():
            del array
        self.arrays = {}
        shutil.rmtree(self.folder, ignore_errors=True)


def absorb_rows(store: Optional[RowStore], ref: Optional[StreamRef], folder: Path, capacity: int) -> Optional[RowStore]:
    """`store` after taking in `ref`'s rows: reopened in place when `ref` is this folder's own stream (resume),
    created like `ref`'s fields and filled when there is no store yet, else appended to (shard merge)."""
    if ref is None:
        return store
    if store is None and Path(ref.location).resolve() == Path(folder).resolve():
        return RowStore.reopen(ref)
    if store is None:
        source = Path(ref.location)
        fields = {}
        for npy in sorted(source.glob("*.npy")):
            array = np.load(npy, mmap_mode="r")
            fields[npy.stem] = (tuple(array.shape[1:]), array.dtype)
        store = RowStore(folder, capacity, fields)
    store.absorb(ref)
    return store


class CsvStream:
    """A CSV file written a row at a time (header first), closed by `close`."""

    def __init__(self, path: Path, header: Sequence[str], _reopen: Optional[StreamRef] = None):
        import csv

        self.path = Path(path)
        if _reopen is None:
            self._file = open(self.path, "w", newline="", encoding="utf-8")
            self.count = 0
            self._writer = csv.writer(self._file)
            self._writer.writerow(header)
        else:
            with open(self.path, "r+b") as handle:
                handle.truncate(_reopen.size)  # rows after the checkpoint are redone
            self._file = open(self.path, "a", newline="", encoding="utf-8")
            self.count = _reopen.count
            self._writer = csv.writer(self._file)

    def writerow(self, row: Sequence[Any]) -> None:
        self._writer.writerow(row)
        self.count += 1

    def ref(self) -> StreamRef:
        self._file.flush()
        return StreamRef(str(self.path), self.count, self._file.buffer.tell())

    def absorb(self, ref: StreamRef) -> None:
        """Append another run's rows (its header skipped), exactly as they were written."""
        self._file.flush()
        with open(ref.location, "rb") as source:
            source.readline()  # header
            remaining = ref.size - source.tell()
            while remaining > 0:
                chunk = source.read(min(remaining, 1 << 20))
                if not chunk:
                    break
                self._file.buffer.write(chunk)
                remaining -= len(chunk)
        self._file.flush()
        self.count += ref.count

    def close(self) -> None:
        self._file.close()


def absorb_csv(stream: Optional[CsvStream], ref: Optional[StreamRef], path: Path,
               header: Sequence[str]) -> Optional[CsvStream]:
    """Like `absorb_rows`, for CSV streams."""
    if ref is None:
        return stream
    if stream is None and Path(ref.location).resolve() == Path(path).resolve():
        return CsvStream(path, header, _reopen=ref)
    if stream is None:
        stream = CsvStream(path, header)
    stream.absorb(ref)
    return stream
