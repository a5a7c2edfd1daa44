"""The image folder: a deterministic scan, robust decoding, and a loader that never dies on one bad file.

Files are sorted by their path relative to the root, so every run, shard and machine sees the same order. Paths are
kept as escaped names (reportgen/inputs/paths.py): valid UTF-8 whatever bytes the file system holds, so any name
goes into every results file and the page; the dataset turns them back into the exact bytes to open the file.
A file that cannot be decoded, or takes longer than `dataset.decode_timeout`, travels through the loader as a
failure record (path, reason) and ends in `results/failed.csv` and the report; the batch goes on without it. A
decoder that crashes or hangs its worker process is handled by the loader (loader.py).
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from PIL import Image, ImageOps
from torch.utils.data import Dataset

from reportgen.config.schema import DatasetConfig, LabelMode
from reportgen.errors import ConfigError
from reportgen.inputs.loader import IsolatingLoader, RawBatch, collate  # noqa: F401  (RawBatch, collate: re-exported)
from reportgen.inputs.paths import escape_name, os_name
from reportgen.inputs.preprocess import Preprocess
from reportgen.inputs.time_limit import DecodeTimeout, time_limit

log = logging.getLogger(__name__)


@dataclass
class ScanResult:
    """What a folder holds: the images in processing order and the class names their labels index."""

    root: Path
    paths: List[str]  # relative posix paths as escaped names (inputs/paths.py), in sorted order of the real names
    labels: List[int]  # class index per path, -1 when the file is not in a class folder
    class_names: List[str]  # first-level subfolder names (escaped), sorted (empty: unlabelled folder)
    skipped: List[Tuple[str, str]] = field(default_factory=list)  # (escaped path, reason) found but not scanned

    def fingerprint(self) -> str:
        """A hash of the sorted file list: resumes and merges check they see the files the run saw."""
        import hashlib

        return hashlib.sha256("\n".join(self.paths).encode("utf-8")).hexdigest()

    def file(self, index: int) -> Path:
        """The file behind `paths[index]`, as the file system names it."""
        return self.root / os_name(self.paths[index])


def scan_folder(root: Path, extensions: Sequence[str], label_mode: LabelMode = LabelMode.auto,
                limit: Optional[int] = None) -> ScanResult:
    """Walk `root` recursively (following symlinks, never the same directory twice, so loops end), keep files whose
    suffix is in `extensions` (case-insensitive, hidden files and folders skipped), sort, and label by class folder."""
    root = Path(root)
    if not root.is_dir():
        raise ConfigError("dataset.root", str(root), "an existing folder of images")
    wanted = {e.lower() if e.startswith(".") else "." + e.lower() for e in extensions}
    found: List[str] = []
    skipped: List[Tuple[str, str]] = []
    seen_dirs = set()

    def on_error(err: OSError) -> None:
        skipped.append((_relative(Path(err.filename or ""), root), f"unreadable folder: {err.strerror}"))

    for dirpath, dirnames, filenames in os.walk(root, followlinks=True, onerror=on_error):
        st = os.stat(dirpath)
        if (st.st_dev, st.st_ino) in seen_dirs:
            skipped.append((_relative(Path(dirpath), root), "folder already scanned (symlink loop or duplicate link)"))
            dirnames[:] = []
            continue
        seen_dirs.add((st.st_dev, st.st_ino))
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            if name.startswith("."):
                continue
            if os.path.splitext(name)[1].lower() in wanted:
                full = Path(dirpath) / name
                if full.is_file():
                    found.append(_relative(full, root))
                else:
                    skipped.append((_relative(full, root), "not a regular file (broken link?)"))
    found.sort()
    if limit is not None:
        found = found[: int(limit)]
    found = [escape_name(p) for p in found]
    skipped = [(escape_name(p), reason) for p, reason in skipped]
    class_names: List[str] = []
    labels = [-1] * len(found)
    if label_mode is not LabelMode.none:
        class_names = sorted({p.split("/")[0] for p in found if "/" in p})
        if label_mode is LabelMode.folders and not class_names:
            raise ConfigError("dataset.labels", "folders", f"class subfolders under {root}, found none",
                              ["auto", "none"])
        index = {name: i for i, name in enumerate(class_names)}
        labels = [index[p.split("/")[0]] if "/" in p else -1 for p in found]
    return ScanResult(root=root, paths=found, labels=labels, class_names=class_names, skipped=skipped)


def _relative(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return path.as_posix()


def decode_image(path: Path, max_pixels: int = Image.MAX_IMAGE_PIXELS) -> Image.Image:
    """Open any PIL-readable image as upright RGB: first frame, EXIF orientation applied, every mode converted.
    An image over `max_pixels` is refused (PIL only warns between 1x and 2x its limit; here it is always an error)."""
    with Image.open(path) as image:
        if image.width * image.height > max_pixels:
            raise Image.DecompressionBombError(
                f"{image.width}x{image.height} = {image.width * image.height:,} pixels is over dataset.max_pixels "
                f"({max_pixels:,}): refused as a possible decompression bomb")
        image.seek(0)
        image.load()
        image = ImageOps.exif_transpose(image)
        if image.mode in ("I;16", "I;16B", "I;16L", "I"):
            image = image.point(lambda v: v / 256).convert("L")  # 16-bit -> 8-bit, keeps the tonal range
        if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
            image = image.convert("RGBA")
            background = Image.new("RGBA", image.size, (255, 255, 255, 255))
            image = Image.alpha_composite(background, image)  # transparent pixels shown on white
        return image.convert("RGB")


class ImageFolderDataset(Dataset):
    """Decodes and crops one file per item within `decode_seconds`; failures come back as a reason string
    instead of an exception."""

    def __init__(self, scan: ScanResult, preprocess: Preprocess, indices: Optional[Sequence[int]] = None,
                 max_pixels: int = Image.MAX_IMAGE_PIXELS, decode_seconds: float = DatasetConfig.decode_timeout):
        self.scan = scan
        self.preprocess = preprocess
        self.max_pixels = int(max_pixels)
        self.decode_seconds = float(decode_seconds)
        self.indices = list(range(len(scan.paths))) if indices is None else list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, item: int) -> Dict[str, Any]:
        index = self.indices[item]
        path = self.scan.file(index)
        try:
            with time_limit(self.decode_seconds):
                decoded = decode_image(path, self.max_pixels)
                image = self.preprocess.to_uint8(decoded)  # (C, H, W) uint8
            return {"index": index, "image": image, "error": None, "size": (decoded.height, decoded.width)}
        except (Exception, DecodeTimeout) as exc:  # any decoder error (truncated, not an image, bomb, too slow)
            return {"index": index, "image": None, "error": self._reason(exc, path, index)}

    def _reason(self, exc: Exception, path: Path, index: int) -> str:
        """The error as one line of valid UTF-8 naming the file relative to the root (decoders quote the path as
        it is or as its repr), never the machine's folder."""
        message = f"{type(exc).__name__}: {exc}"
        rel = os_name(self.scan.paths[index])
        for full in (repr(str(path))[1:-1], str(path)):
            message = message.replace(full, rel)
        return escape_name(message)


def example_batch(dataset: ImageFolderDataset, count: int, attempts: int, num_workers: int = 0) -> Optional[RawBatch]:
    """The first `count` items that decode, in order (fewer when `attempts` items were tried and at least one
    decoded; the search goes on until one does). None when nothing in the dataset decodes. With `num_workers` > 0
    they are decoded in a worker process, so a decoder crash among the first files costs only that file.
    Images of several sizes (the `whole` preprocessing): only those of the first image's size are kept, so the example
    is one batch."""
    indices: List[torch.Tensor] = []
    images: List[torch.Tensor] = []
    sizes: List[torch.Tensor] = []
    tried = 0
    for raw in IsolatingLoader(dataset, count, min(num_workers, 1), False, dataset.decode_seconds):
        for group in raw.groups():
            keep = not images or group.images.shape[1:] == images[0].shape
            indices.extend(group.indices if keep else [])
            images.extend(group.images if keep else [])
            sizes.extend(group.sizes if keep else [])
        tried += raw.size
        if len(images) >= count or (images and tried >= attempts):
            break
    if not images:
        return None
    return RawBatch(indices=torch.stack(indices[:count]), images=torch.stack(images[:count]), failed=[],
                    sizes=torch.stack(sizes[:count]))


def make_loader(dataset: ImageFolderDataset, batch_size: int, num_workers: int, pin_memory: bool) -> IsolatingLoader:
    """Ordered batches (no shuffling: results and shards stay deterministic), workers kept alive; with workers, a
    decoder that crashes or hangs costs only its file (loader.py)."""
    return IsolatingLoader(dataset, batch_size, num_workers, pin_memory, dataset.decode_seconds)
