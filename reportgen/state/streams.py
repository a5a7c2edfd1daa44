"""Per-image rows streamed to disk during the pass, so memory stays flat however large the folder is.

Two kinds of stream: `RowStore` (one .npy file per field, sized for the whole folder and written row range by row
range; rows past the last image are never written, so the files stay sparse) and `CsvStream` (a CSV written row by row). Both can describe
themselves as a `StreamRef` inside an analysis's state, and `absorb` a ref: reopening it in place when it is this
run's own stream (resume after a crash: rows past the checkpoint are dropped) or copying its rows after the current
ones when it is another run's (merging shards, in shard order, so rows end in the sorted order of the folder).
"""
from __future__ import annotations

import csv
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

COPY_ROWS = 4096  # rows copied or packed at a time (bounded memory: 4096 x 2048 float32 = 32 MiB)


@dataclass
class StreamRef:
    """Where a stream's rows are and how many belong to the saved state: `location` is the store folder or the
    CSV file, `count` the rows, `size` the bytes of the paths file or CSV that hold exactly those rows."""

    location: str
    count: int
    size: int


class RowStore:
    """Fixed-shape rows per field, each field an `.npy` file sized for `capacity` rows (sparse on disk), written and
    read with plain file I/O in row ranges: no memory map, so nothing of the folder's rows stays resident in this
    process however many images pass (a mapped file's touched pages would count in its memory)."""

    def __init__(self, folder: Path, capacity: int, fields: Dict[str, Tuple[Tuple[int, ...], Any]]):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.capacity = max(1, int(capacity))
        self.count = 0
        self.fields: Dict[str, RowFile] = {}
        for name, (shape, dtype) in fields.items():
            self.fields[name] = RowFile.create(self.folder / f"{name}.npy", (self.capacity, *shape), np.dtype(dtype))
        self._paths = open(self.folder / "paths.jsonl", "w", encoding="utf-8")

    @classmethod
    def reopen(cls, ref: StreamRef) -> "RowStore":
        """This run's own store after a restart, holding exactly the `ref.count` rows of the saved state."""
        store = cls.__new__(cls)
        store.folder = Path(ref.location)
        store.fields = {p.stem: RowFile.open(p) for p in sorted(store.folder.glob("*.npy"))}
        store.capacity = next(iter(store.fields.values())).shape[0]
        store.count = ref.count
        paths_file = store.folder / "paths.jsonl"
        with open(paths_file, "r+b") as handle:
            handle.truncate(ref.size)  # lines written after the checkpoint belong to rows being redone
        store._paths = open(paths_file, "a", encoding="utf-8")
        return store

    def append(self, paths: Sequence[str], **rows: np.ndarray) -> None:
        """Write one batch: `paths` (B,) and, for every field, an array of shape (B, *field shape)."""
        end = self.count + len(paths)
        if end > self.capacity:
            raise ValueError(f"RowStore sized for {self.capacity} rows received {end}")
        for name, stored in self.fields.items():
            stored.write(self.count, rows[name])
        for path in paths:
            self._paths.write(json.dumps(path) + "\n")
        self.count = end

    def read(self, name: str, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) of one field."""
        return self.fields[name].read(start, min(stop, self.count))

    def ref(self) -> StreamRef:
        """Flush to disk and describe the rows written so far (for checkpoints and shard states)."""
        for stored in self.fields.values():
            stored.handle.flush()
        self._paths.flush()
        return StreamRef(str(self.folder), self.count, self._paths.buffer.tell())

    def absorb(self, ref: StreamRef) -> None:
        """Append the rows of another run's store (`ref`) after this store's rows, in order."""
        folder = Path(ref.location)
        sources = {name: RowFile.open(folder / f"{name}.npy") for name in self.fields}
        with open(folder / "paths.jsonl", encoding="utf-8") as handle:
            for first in range(0, ref.count, COPY_ROWS):
                last = min(first + COPY_ROWS, ref.count)
                paths = [json.loads(handle.readline()) for _ in range(last - first)]
                self.append(paths, **{name: source.read(first, last) for name, source in sources.items()})
        for source in sources.values():
            source.handle.close()

    def pack(self, out_path: Path, **extra: Any) -> None:
        """Write `paths` and every field (first `count` rows) plus `extra` arrays to one .npz, streaming the rows in
        chunks. The store's own files stay until the run is finished (`remove_stream_folders`), so a run killed
        while finalizing can resume from its last checkpoint."""
        import zipfile

        self._paths.close()
        with open(self.folder / "paths.jsonl", encoding="utf-8") as handle:
            paths: List[str] = [json.loads(line) for line in handle]
        tmp = Path(out_path).with_name(Path(out_path).name + ".tmp.npz")
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED, allowZip64=True) as archive:
            for name, array in [("paths", np.array(paths, dtype=str)), *extra.items()]:
                with archive.open(f"{name}.npy", "w", force_zip64=True) as member:
                    np.lib.format.write_array(member, np.asanyarray(array), allow_pickle=False)
            for name, stored in self.fields.items():
                with archive.open(f"{name}.npy", "w", force_zip64=True) as member:
                    header = {"descr": np.lib.format.dtype_to_descr(stored.dtype), "fortran_order": False,
                              "shape": (self.count, *stored.shape[1:])}
                    np.lib.format.write_array_header_2_0(member, header)
                    for first in range(0, self.count, COPY_ROWS):
                        member.write(stored.read(first, min(first + COPY_ROWS, self.count)).tobytes())
        os.replace(tmp, out_path)
        for stored in self.fields.values():
            stored.handle.close()
        self.fields = {}


@dataclass
class RowFile:
    """One field's .npy file: rows of `shape[1:]` at `offset` bytes past the header, read and written in place."""

    handle: Any
    shape: Tuple[int, ...]
    dtype: np.dtype
    offset: int

    @property
    def row_bytes(self) -> int:
        return int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize

    @classmethod
    def create(cls, path: Path, shape: Tuple[int, ...], dtype: np.dtype) -> "RowFile":
        handle = open(path, "w+b")
        header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": shape}
        np.lib.format.write_array_header_2_0(handle, header)
        field = cls(handle, shape, dtype, handle.tell())
        handle.truncate(field.offset + shape[0] * field.row_bytes)  # sparse: blocks appear as rows are written
        return field

    @classmethod
    def open(cls, path: Path) -> "RowFile":
        handle = open(path, "r+b")
        major, _ = np.lib.format.read_magic(handle)
        reader = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
        shape, _, dtype = reader(handle)  # (shape, fortran_order, dtype)
        return cls(handle, tuple(shape), np.dtype(dtype), handle.tell())

    def write(self, row: int, values: np.ndarray) -> None:
        data = np.ascontiguousarray(values, dtype=self.dtype)
        self.handle.seek(self.offset + row * self.row_bytes)
        self.handle.write(data.tobytes())

    def read(self, start: int, stop: int) -> np.ndarray:
        count = max(0, stop - start)
        self.handle.seek(self.offset + start * self.row_bytes)
        data = self.handle.read(count * self.row_bytes)
        return np.frombuffer(data, dtype=self.dtype).reshape(count, *self.shape[1:])


def remove_stream_folders(results_dir: Path) -> None:
    """Delete the row stores of a finished run (hidden folders `results/.<analysis>` holding a paths.jsonl)."""
    for folder in Path(results_dir).glob(".*"):
        if folder.is_dir() and (folder / "paths.jsonl").exists():
            shutil.rmtree(folder, ignore_errors=True)


def absorb_rows(store: Optional[RowStore], ref: Optional[StreamRef], folder: Path, capacity: int) -> Optional[RowStore]:
    """`store` after taking in `ref`'s rows: reopened in place when `ref` is this folder's own stream (resume),
    created like `ref`'s fields and filled when there is no store yet, else appended to (shard merge)."""
    if ref is None:
        return store
    if store is None and Path(ref.location).resolve() == Path(folder).resolve():
        return RowStore.reopen(ref)
    if store is None:
        fields = {}
        for npy in sorted(Path(ref.location).glob("*.npy")):
            source = RowFile.open(npy)
            fields[npy.stem] = (source.shape[1:], source.dtype)
            source.handle.close()
        store = RowStore(folder, capacity, fields)
    store.absorb(ref)
    return store


class CsvStream:
    """A CSV file written a row at a time (header first), closed by `close`."""

    def __init__(self, path: Path, header: Sequence[str], _reopen: Optional[StreamRef] = None):
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
