"""What the folder-level analyses (`label_issues`, `slices`) read at finalize, and the optional libraries they use.

They keep no state of their own during the pass: the `predictions` analysis already streams every image's row
(results/predictions.csv: path, folder class) and full probability vector (results/probabilities.npy, N x K float32
in the same order), and says how logits became probabilities (results/predictions.json `activation`). Reading those
files after predictions has finalized (`reads`) makes both analyses exact across shards for free: a merged run's
files are the whole folder's.

Folder classes map to probability columns as predictions' accuracy maps them (`folder_targets`: names, WordNet ids,
a binary head's two outcomes); an image whose folder matches no column has no target (-1), like an unlabelled one.
"""
from __future__ import annotations

import csv
import importlib
import json
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Iterator, List, Optional, Tuple

import numpy as np

from reportgen.errors import ConfigError
from reportgen.state.streams import COPY_ROWS, RowFile



def require(package: str, analysis: str, purpose: str, extra: str = "folder") -> ModuleType:
    """Import an optional library of an extra (`folder` by default), or a ConfigError (raised before the pass)
    naming the extra that installs it."""
    try:
        return importlib.import_module(package)
    except ImportError as exc:
        raise ConfigError("analysis", analysis,
                          f"'{package}' installed for {purpose} (pip install 'reportgen[{extra}]')") from exc


@dataclass
class FolderPredictions:
    """The predictions analysis's per-image results, row for row (predictions.csv's order)."""

    paths: List[str]  # (N,) relative paths
    labels: np.ndarray  # (N,) folder class index, -1 unlabelled
    targets: np.ndarray  # (N,) probability column of the folder class, -1 unlabelled or matching no column
    folder_columns: np.ndarray  # (n_folder,) the probability column each folder class matches, -1 none
    top1: np.ndarray  # (N,) predicted column (predictions.csv's top1_index)
    mode: str  # softmax | binary | multi-label (predictions.json `activation`)
    names: List[str]  # (K,) one name per probability column
    probabilities: Path  # results/probabilities.npy, (N, K) float32

    def folder_of(self, column: int) -> int:
        """The first folder class matching probability column `column` (-1: none)."""
        hits = np.flatnonzero(self.folder_columns == column)
        return int(hits[0]) if len(hits) else -1

    def chunks(self, rows: int = COPY_ROWS) -> Iterator[Tuple[int, int, np.ndarray]]:
        """(start, stop, probabilities (n, K) float32) over every row, `rows` at a time (plain reads, no map)."""
        stored = RowFile.open(self.probabilities)
        try:
            for start in range(0, len(self.paths), rows):
                stop = min(start + rows, len(self.paths))
                yield start, stop, stored.read(start, stop).copy()
        finally:
            stored.handle.close()


def read_predictions(ctx: Any) -> Tuple[Optional[FolderPredictions], str]:
    """(the predictions results of this run, "") or (None, why they cannot be read)."""
    from reportgen.analyses.predictions import CSV_HEADER, PROBABILITIES_FILE, column_names, folder_targets

    results = Path(ctx.results_dir)
    csv_path, json_path = results / "predictions.csv", results / "predictions.json"
    npy_path = results / PROBABILITIES_FILE
    if not (csv_path.is_file() and json_path.is_file() and npy_path.is_file()):
        return None, ("it reads the predictions analysis's results (predictions.csv, probabilities.npy), which "
                      "this run does not have: add predictions to the run, e.g. analysis=[predictions,...], with "
                      "analysis.predictions.save_probabilities=true (the default) (or no image was processed)")
    mode = str(json.loads(json_path.read_text(encoding="utf-8")).get("activation", "softmax"))
    by_name = {name: index for index, name in enumerate(ctx.dataset_classes)}
    paths: List[str] = []
    labels: List[int] = []
    top1: List[int] = []
    with open(csv_path, newline="", encoding="utf-8") as handle:
        reader = csv.reader(handle)
        if next(reader, None) != CSV_HEADER:
            return None, "results/predictions.csv does not have the columns this version writes"
        for row in reader:
            paths.append(row[0])
            labels.append(by_name.get(row[1], -1) if row[1] else -1)
            top1.append(int(row[2]))
    stored = RowFile.open(npy_path)
    stored.handle.close()
    if stored.shape[0] != len(paths):
        return None, (f"results/probabilities.npy has {stored.shape[0]} rows but predictions.csv {len(paths)}; "
                      f"run the folder again")
    num_columns = int(stored.shape[1])
    num_outputs = 1 if mode == "binary" else num_columns
    mapping = folder_targets(list(ctx.dataset_classes), ctx.loaded, mode, num_outputs)  # (n_folder,)
    label_array = np.asarray(labels, dtype=np.int64)  # (N,)
    targets = np.where(label_array >= 0, mapping[label_array.clip(min=0)] if len(mapping) else -1, -1)  # (N,)
    return FolderPredictions(paths, label_array, targets.astype(np.int64), mapping,
                             np.asarray(top1, dtype=np.int64), mode, column_names(ctx.loaded, mode, num_columns),
                             npy_path), ""


def copy_embeddings(ctx: Any, paths: List[str], folder: Path) -> Tuple[Optional[RowFile], np.ndarray, str]:
    """The activations analysis's penultimate features (results/embeddings.npz `features`) of `paths`, copied chunk
    by chunk into `folder`/features.npy (float32, row i = paths[i], read back in row ranges: the archive member is
    compressed, so it has no random access), and which rows have features (N,). (None, none, why) without them."""
    import zipfile

    present = np.zeros(len(paths), dtype=bool)  # (N,)
    npz = Path(ctx.results_dir) / "embeddings.npz"
    if not npz.is_file():
        return None, present, ("they need the activations analysis's embedding (results/embeddings.npz): add "
                               "activations to the run, with analysis.activations.embedding=true")
    with zipfile.ZipFile(npz) as archive:
        with archive.open("paths.npy") as member:
            stored_paths = np.lib.format.read_array(member, allow_pickle=False)  # (n,)
        position = {path: i for i, path in enumerate(paths)}
        destination = np.array([position.get(str(p), -1) for p in stored_paths], dtype=np.int64)  # (n,)
        present[destination[destination >= 0]] = True
        with archive.open("features.npy") as member:
            major, _ = np.lib.format.read_magic(member)
            reader = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
            shape, _, dtype = reader(member)  # (n, D)
            folder.mkdir(parents=True, exist_ok=True)
            copy = RowFile.create(folder / "features.npy", (len(paths), *shape[1:]), np.dtype(np.float32))
            row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * np.dtype(dtype).itemsize
            for start in range(0, shape[0], COPY_ROWS):
                stop = min(start + COPY_ROWS, shape[0])
                chunk = np.frombuffer(member.read((stop - start) * row_bytes), dtype=dtype)
                chunk = chunk.reshape(stop - start, *shape[1:]).astype(np.float32)  # (n, D)
                where = destination[start:stop]
                if len(where) and where[0] >= 0 and np.array_equal(where, where[0] + np.arange(len(where))):
                    copy.write(int(where[0]), chunk)  # the usual case: both in the folder's sorted order
                    continue
                for row, target in zip(chunk, where):
                    if target >= 0:
                        copy.write(int(target), row[None])
    copy.handle.flush()
    return copy, present, ""


def placeholder(ctx: Any) -> np.ndarray:
    """A grey (s, s, 3) tile for an image that could not be read again."""
    size = int(ctx.report.thumbnail_size)
    return np.full((size, size, 3), 128, dtype=np.uint8)


def single_label_predictions(ctx: Any, nothing: str, needs: str) -> Tuple[Optional[FolderPredictions], str]:
    """(this run's predictions, "") when they are one softmax (or binary) distribution per image; else (None, the
    line the section shows instead): `nothing` names what is missing ("label issues"), `needs` who needs a single
    distribution ("confident learning needs")."""
    data, why = read_predictions(ctx)
    if data is None:
        return None, f"No {nothing}: {why}."
    if data.mode == "multi-label":
        return None, (f"Not applicable because the head is multi-label (independent sigmoid probabilities): {needs} "
                      f"one probability distribution over the classes per image.")
    return data, ""
