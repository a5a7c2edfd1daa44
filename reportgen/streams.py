"""Per-image arrays streamed to disk during the pass, so memory stays flat however large the folder is.

Each field is a numpy memmap sized for the whole folder (rows past the last image are never written); paths go to
a JSON-lines file. `pack` writes the documented `.npz` and removes the temporaries.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Dict, List, Sequence, Tuple

import numpy as np


class RowStore:
    def __init__(self, folder: Path, capacity: int, fields: Dict[str, Tuple[Tuple[int, ...], Any]]):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.capacity = max(1, int(capacity))
        self.count = 0
        self.arrays = {
            name: np.lib.format.open_memmap(self.folder / f"{name}.npy", mode="w+", dtype=dtype,
                                            shape=(self.capacity, *shape))
            for name, (shape, dtype) in fields.items()
        }
        self._paths = open(self.folder / "paths.jsonl", "w", encoding="utf-8")

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
