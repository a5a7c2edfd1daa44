"""Damaged images never kill or hang a run: fuzzed JPEG/PNG/GIF/WebP/TIFF files (truncated, bits flipped, headers
overwritten) are each decoded or listed with a reason, by the real decoders; a decoder that crashes its process,
hangs where Python cannot interrupt it, or runs past the per-file time limit costs only its own file."""
import csv
import io
import os
import random
import signal
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image, ImageFile

import reportgen.inputs.loader as loader_module
from reportgen.inputs.data import ImageFolderDataset, decode_image, scan_folder
from reportgen.inputs.preprocess import Preprocess
from reportgen.runs.pipeline import run
from tests.helpers import TINY, compose_config, make_colour_folder

FORMATS = {"jpg": "JPEG", "png": "PNG", "gif": "GIF", "webp": "WEBP", "tif": "TIFF"}


def _valid_files():
    """One small valid file per format (GIF with three frames, TIFF deflate-compressed)."""
    rng = np.random.default_rng(0)
    frames = [Image.fromarray(rng.integers(0, 255, (24, 32, 3), dtype=np.uint8)) for _ in range(3)]
    files = {}
    for suffix, fmt in FORMATS.items():
        buffer = io.BytesIO()
        if fmt == "GIF":
            frames[0].save(buffer, format=fmt, save_all=True, append_images=frames[1:])
        elif fmt == "TIFF":
            frames[0].save(buffer, format=fmt, compression="tiff_adobe_deflate")
        else:
            frames[0].save(buffer, format=fmt)
        files[suffix] = buffer.getvalue()
    return files


VALID = _valid_files()


def damage(data: bytes, kind: str, where: float, value: int, count: int) -> bytes:
    """A truncation, bit flips anywhere, or bytes of the header overwritten."""
    out = bytearray(data)
    position = int(where * (len(out) - 1))
    if kind == "truncate":
        return bytes(out[:position])
    for i in range(count):
        if kind == "flip":
            at = (position + i * 131) % len(out)
            out[at] ^= 1 << (value % 8)
        else:  # header
            out[(position + i) % min(48, len(out))] = (value + 37 * i) % 256
    return bytes(out)


def dataset_of(root: Path, **kwargs) -> ImageFolderDataset:
    scan = scan_folder(root, [f".{s}" for s in FORMATS], limit=None)
    return ImageFolderDataset(scan, Preprocess(resize=16, crop=16), max_pixels=4_000_000, **kwargs)


@settings(max_examples=400, deadline=None, derandomize=True, database=None)
@given(suffix=st.sampled_from(sorted(FORMATS)), kind=st.sampled_from(["truncate", "flip", "header"]),
       where=st.floats(0, 1), value=st.integers(0, 255), count=st.integers(1, 8))
def test_a_damaged_file_is_decoded_or_failed_with_a_reason(suffix, kind, where, value, count):
    """No time assertion (shared CI machines): a hang would be stopped by the per-file limit, then fail here."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / f"damaged.{suffix}").write_bytes(damage(VALID[suffix], kind, where, value, count))
        sample = dataset_of(folder, decode_seconds=20)[0]
        if sample["error"] is None:
            assert sample["image"].shape == (3, 16, 16) and sample["image"].dtype == torch.uint8
            decode_image(folder / f"damaged.{suffix}", 4_000_000)  # decodes outside the dataset as well
        else:
            assert sample["image"] is None and sample["error"].strip()
            sample["error"].encode("utf-8")
            assert str(folder) not in sample["error"]


@pytest.fixture
def damaged_folder(tmp_path):
    """Every format valid, then 6 damaged copies of each (fixed seed): 35 files."""
    root = tmp_path / "damaged"
    root.mkdir()
    rng = random.Random(7)
    for suffix, data in VALID.items():
        (root / f"valid.{suffix}").write_bytes(data)
        for i in range(6):
            kind = ["truncate", "flip", "header"][i % 3]
            (root / f"damaged_{i}.{suffix}").write_bytes(damage(data, kind, rng.random(), rng.randrange(256),
                                                                rng.randrange(1, 9)))
    return root


@pytest.mark.parametrize("workers", [0, 2])
def test_a_folder_of_damaged_files_runs_to_the_end(damaged_folder, tmp_path, workers):
    cfg = compose_config(TINY + [f"dataset.root={damaged_folder}", "runtime.batch_size=4",
                                 f"runtime.num_workers={workers}", "analysis=[predictions,gradcam]"])
    run(cfg, out_dir=tmp_path / "run")
    processed, failed = read_outcome(tmp_path / "run")
    assert not processed & set(failed) and len(processed) + len(failed) == 35
    assert {f"valid.{s}" for s in FORMATS} <= processed
    assert failed and all(reason.strip() for reason in failed.values())


def read_outcome(run_dir: Path):
    with open(run_dir / "results" / "predictions.csv", newline="", encoding="utf-8") as handle:
        processed = {row["path"] for row in csv.DictReader(handle)}
    with open(run_dir / "results" / "failed.csv", newline="", encoding="utf-8") as handle:
        failed = {row["path"]: row["reason"] for row in csv.DictReader(handle)}
    return processed, failed


class HostileImage(ImageFile.ImageFile):
    """A test-only format whose decoder misbehaves as native codecs can: crashes its process (SIGSEGV), hangs
    where no Python handler runs (SIGALRM blocked, as in a C loop), or loops in Python past any time limit."""

    format = "HOSTILE"
    format_description = "test decoder that crashes or hangs"

    def _open(self):
        self.behaviour = self.fp.read(8)
        self._size = (8, 8)
        self._mode = "RGB"

    def load(self):
        if self.behaviour == b"SEGFAULT":
            os.kill(os.getpid(), signal.SIGSEGV)
        if self.behaviour == b"NATIVEHG":
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
            time.sleep(3600)
        while self.behaviour == b"SLOWLOOP":
            time.sleep(0.01)
        return super().load()


@pytest.fixture
def hostile_format():
    Image.register_open(HostileImage.format, HostileImage, lambda prefix: prefix[:8] in (b"SEGFAULT", b"NATIVEHG",
                                                                                        b"SLOWLOOP"))
    yield
    Image.OPEN.pop(HostileImage.format, None)
    Image.ID.remove(HostileImage.format)


def test_crashing_and_hanging_decoders_cost_only_their_file(hostile_format, tmp_path, monkeypatch):
    """Workers: a crash and a native hang each end a worker and are listed; the Python loop meets the time limit.
    They sort last, after the 16 images the analyses are set up on."""
    monkeypatch.setattr(loader_module, "STARTUP_SECONDS", 2.0)
    root = make_colour_folder(tmp_path / "data", per_class=6, noise=20, seed=4)
    for behaviour in (b"SEGFAULT", b"NATIVEHG", b"SLOWLOOP"):
        (root / "red" / f"zz_{behaviour.decode().lower()}.png").write_bytes(behaviour + b"\0" * 16)
    (root / "red" / "zzz_after.png").write_bytes((root / "red" / "red_0.png").read_bytes())
    cfg = compose_config(TINY + [f"dataset.root={root}", "runtime.batch_size=4", "runtime.num_workers=1",
                                 "dataset.decode_timeout=0.5", "analysis=[predictions]"])
    run(cfg, out_dir=tmp_path / "run")
    processed, failed = read_outcome(tmp_path / "run")
    assert len(processed) == 19 and "red/zzz_after.png" in processed  # every readable file, also after them
    assert "crashed its worker process (SIGSEGV)" in failed["red/zz_segfault.png"]
    assert "did not finish within 2.5 s" in failed["red/zz_nativehg.png"]
    assert "took longer than 0.5 s" in failed["red/zz_slowloop.png"]


def test_without_workers_the_time_limit_still_bounds_python_decoders(hostile_format, tmp_path):
    root = make_colour_folder(tmp_path / "data", per_class=2, noise=20, seed=5)
    (root / "blue" / "slow.png").write_bytes(b"SLOWLOOP" + b"\0" * 16)
    cfg = compose_config(TINY + [f"dataset.root={root}", "dataset.decode_timeout=0.5", "analysis=[predictions]"])
    run(cfg, out_dir=tmp_path / "run")
    processed, failed = read_outcome(tmp_path / "run")
    assert len(processed) == 6 and "took longer than 0.5 s" in failed["blue/slow.png"]
