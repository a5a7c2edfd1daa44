"""reportgen.inputs.data: folder scan, decoding of awkward images, the fault-tolerant loader; and the preprocess split."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from reportgen.config.schema import LabelMode
from reportgen.errors import ConfigError
from reportgen.inputs.data import ImageFolderDataset, RawBatch, collate, decode_image, make_loader, scan_folder
from reportgen.inputs.preprocess import Preprocess

EXTS = [".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"]


def noise(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB")


def save(path: Path, image: Image.Image, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **kwargs)
    return path


def touch_image(path: Path, seed: int = 0) -> Path:
    """A real small image in the format its suffix names (case-insensitively)."""
    fmt = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG"}[path.suffix.lower()]
    return save(path, noise(12, 9, seed), format=fmt)


# ---------------------------------------------------------------------------------------------------------------
# scan_folder


@pytest.fixture
def image_tree(tmp_path):
    root = tmp_path / "images"
    touch_image(root / "dog" / "x.Png", 1)
    touch_image(root / "cat" / "b.jpg", 2)
    touch_image(root / "cat" / "a.PNG", 3)
    touch_image(root / "cat" / "sub" / "c.JPG", 4)  # deeper folders still belong to the first-level class
    touch_image(root / "top.jpg", 5)  # not in a class folder
    touch_image(root / "cat" / ".hidden.jpg", 6)
    touch_image(root / ".git" / "h.jpg", 7)
    touch_image(root / "cat" / ".thumbs" / "t.jpg", 8)
    (root / "cat" / "notes.txt").write_text("not an image")
    (root / "readme.md").write_text("# hi")
    (root / "empty_class").mkdir()
    (root / "docs").mkdir()
    (root / "docs" / "paper.pdf").write_bytes(b"%PDF-1.4")
    return root


def test_scan_sorted_paths_and_labels(image_tree):
    scan = scan_folder(image_tree, EXTS)
    assert scan.root == image_tree
    assert scan.paths == ["cat/a.PNG", "cat/b.jpg", "cat/sub/c.JPG", "dog/x.Png", "top.jpg"]
    assert scan.class_names == ["cat", "dog"]  # folders without images are not classes
    assert scan.labels == [0, 0, 0, 1, -1]
    assert scan.skipped == []


def test_scan_accepts_path_string_and_dotless_uppercase_extensions(image_tree):
    scan = scan_folder(str(image_tree), ["JPG"])
    assert scan.paths == ["cat/b.jpg", "cat/sub/c.JPG", "top.jpg"]
    scan = scan_folder(image_tree, [".PNG"])
    assert scan.paths == ["cat/a.PNG", "dog/x.Png"]
    assert scan.class_names == ["cat", "dog"]


def test_scan_label_modes(image_tree, tmp_path):
    none = scan_folder(image_tree, EXTS, label_mode=LabelMode.none)
    assert none.paths == ["cat/a.PNG", "cat/b.jpg", "cat/sub/c.JPG", "dog/x.Png", "top.jpg"]
    assert none.class_names == []
    assert none.labels == [-1] * 5

    folders = scan_folder(image_tree, EXTS, label_mode=LabelMode.folders)
    assert folders.class_names == ["cat", "dog"]
    assert folders.labels == [0, 0, 0, 1, -1]

    flat = tmp_path / "flat"
    touch_image(flat / "one.jpg")
    touch_image(flat / "two.png")
    auto = scan_folder(flat, EXTS)
    assert (auto.paths, auto.class_names, auto.labels) == (["one.jpg", "two.png"], [], [-1, -1])
    with pytest.raises(ConfigError) as info:
        scan_folder(flat, EXTS, label_mode=LabelMode.folders)
    assert info.value.key == "dataset.labels"


def test_scan_limit_keeps_first_of_sorted_list(image_tree):
    scan = scan_folder(image_tree, EXTS, limit=2)
    assert scan.paths == ["cat/a.PNG", "cat/b.jpg"]
    assert scan.labels == [0, 0]
    scan = scan_folder(image_tree, EXTS, limit=4)
    assert scan.paths == ["cat/a.PNG", "cat/b.jpg", "cat/sub/c.JPG", "dog/x.Png"]
    assert scan.labels == [scan.class_names.index("cat")] * 3 + [scan.class_names.index("dog")]
    assert len(scan_folder(image_tree, EXTS, limit=100).paths) == 5


def test_scan_missing_root_is_config_error(tmp_path):
    with pytest.raises(ConfigError) as info:
        scan_folder(tmp_path / "nope", EXTS)
    assert info.value.key == "dataset.root"
    touch_image(tmp_path / "file.jpg")
    with pytest.raises(ConfigError):
        scan_folder(tmp_path / "file.jpg", EXTS)


def test_scan_symlink_loop_terminates_and_lists_each_file_once(tmp_path):
    root = tmp_path / "root"
    touch_image(root / "a" / "img.png")
    touch_image(root / "a" / "deeper" / "d.jpg")
    touch_image(root / "b" / "img2.jpg")
    os.symlink(root / "a", root / "a" / "loop")  # a/loop -> a
    os.symlink(root, root / "b" / "up")  # b/up -> the root itself
    scan = scan_folder(root, EXTS)
    assert scan.paths == ["a/deeper/d.jpg", "a/img.png", "b/img2.jpg"]
    assert scan.class_names == ["a", "b"]
    assert scan.labels == [0, 0, 1]
    skipped = dict(scan.skipped)
    assert set(skipped) == {"a/loop", "b/up"}
    assert all("already scanned" in reason for reason in skipped.values())


def test_scan_symlinked_folder_outside_root_is_followed(tmp_path):
    outside = tmp_path / "elsewhere"
    touch_image(outside / "far.jpg")
    root = tmp_path / "root"
    touch_image(root / "near" / "n.jpg")
    os.symlink(outside, root / "linked")
    scan = scan_folder(root, EXTS)
    assert scan.paths == ["linked/far.jpg", "near/n.jpg"]
    assert scan.class_names == ["linked", "near"]


def test_scan_broken_symlink_is_skipped_with_reason(tmp_path):
    root = tmp_path / "root"
    touch_image(root / "cls" / "ok.jpg")
    os.symlink(tmp_path / "does_not_exist.jpg", root / "cls" / "broken.jpg")
    os.symlink(tmp_path / "does_not_exist.txt", root / "cls" / "broken.txt")  # not an image suffix: ignored
    scan = scan_folder(root, EXTS)
    assert scan.paths == ["cls/ok.jpg"]
    assert len(scan.skipped) == 1
    path, reason = scan.skipped[0]
    assert path == "cls/broken.jpg"
    assert "broken link" in reason


# ---------------------------------------------------------------------------------------------------------------
# decode_image


def block_mean(image: Image.Image, box) -> np.ndarray:
    """Mean RGB of a box (left, top, right, bottom)."""
    return np.asarray(image.crop(box), dtype=np.float64).reshape(-1, 3).mean(axis=0)


def test_decode_exif_rotated_jpeg_is_upright(tmp_path):
    stored = Image.new("RGB", (48, 24), (0, 0, 255))  # landscape as stored, blue
    stored.paste((255, 0, 0), (0, 0, 8, 8))  # red block at the stored top-left
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: the viewer must rotate 90 degrees clockwise
    path = save(tmp_path / "rotated.jpg", stored, exif=exif.tobytes(), quality=95)
    with Image.open(path) as raw:
        assert raw.size == (48, 24)  # the file itself is not rotated
    image = decode_image(path)
    assert image.mode == "RGB"
    assert image.size == (24, 48)  # width and height swapped
    # rotating clockwise moves the stored top-left corner to the top-right
    assert np.allclose(block_mean(image, (17, 1, 23, 7)), (255, 0, 0), atol=12)
    assert np.allclose(block_mean(image, (1, 1, 7, 7)), (0, 0, 255), atol=12)
    assert np.allclose(block_mean(image, (17, 41, 23, 47)), (0, 0, 255), atol=12)
    # the orientation is applied once only: decoding is idempotent on the file
    assert decode_image(path).size == (24, 48)


def test_decode_rgba_on_white(tmp_path):
    rgba = Image.new("RGBA", (10, 6), (0, 0, 0, 0))  # fully transparent black
    rgba.paste((10, 200, 30, 255), (0, 0, 5, 6))  # left half opaque green
    image = decode_image(save(tmp_path / "a.png", rgba))
    assert image.mode == "RGB" and image.size == (10, 6)
    assert image.getpixel((1, 1)) == (10, 200, 30)
    assert image.getpixel((8, 3)) == (255, 255, 255)


def test_decode_la_and_palette_with_transparency(tmp_path):
    la = Image.new("LA", (4, 4), (0, 0))
    la.putpixel((0, 0), (90, 255))
    image = decode_image(save(tmp_path / "la.png", la))
    assert image.getpixel((0, 0)) == (90, 90, 90)
    assert image.getpixel((3, 3)) == (255, 255, 255)

    pal = Image.new("P", (4, 4), 1)
    pal.putpalette([0, 0, 0, 200, 20, 40, 5, 6, 7] + [0] * (256 * 3 - 9))
    pal.putpixel((2, 2), 2)
    image = decode_image(save(tmp_path / "pt.png", pal, transparency=2))
    assert image.mode == "RGB"
    assert image.getpixel((0, 0)) == (200, 20, 40)
    assert image.getpixel((2, 2)) == (255, 255, 255)  # transparent palette entry -> white


def test_decode_palette_png(tmp_path):
    pal = Image.new("P", (7, 5), 0)
    pal.putpalette([12, 34, 56, 250, 128, 0] + [0] * (256 * 3 - 6))
    pal.putpixel((6, 4), 1)
    path = save(tmp_path / "p.png", pal)
    with Image.open(path) as raw:
        assert raw.mode == "P"
    image = decode_image(path)
    assert image.mode == "RGB" and image.size == (7, 5)
    assert image.getpixel((0, 0)) == (12, 34, 56)
    assert image.getpixel((6, 4)) == (250, 128, 0)


def test_decode_grayscale(tmp_path):
    gray = Image.new("L", (5, 3), 100)
    image = decode_image(save(tmp_path / "g.png", gray))
    assert image.mode == "RGB" and image.size == (5, 3)
    assert image.getpixel((4, 2)) == (100, 100, 100)


def test_decode_16bit_png_keeps_tonal_range(tmp_path):
    values = (np.arange(4 * 256, dtype=np.int64).reshape(4, 256) * 64).astype(np.uint16)  # 0 .. 65472
    path = save(tmp_path / "g16.png", Image.fromarray(values))
    with Image.open(path) as raw:
        assert raw.mode == "I;16"
    image = decode_image(path)
    assert image.mode == "RGB" and image.size == (256, 4)
    got = np.asarray(image)
    assert np.array_equal(got[..., 0], got[..., 2])
    assert np.array_equal(got[..., 0], (values >> 8).astype(np.uint8))  # 16-bit value / 256, not clipped at 255
    assert got.max() == 255 and got.min() == 0


def test_decode_cmyk_jpeg(tmp_path):
    cmyk = Image.new("CMYK", (9, 7), (0, 255, 255, 0))  # red
    path = save(tmp_path / "c.jpg", cmyk, quality=95)
    with Image.open(path) as raw:
        assert raw.mode == "CMYK"
    image = decode_image(path)
    assert image.mode == "RGB" and image.size == (9, 7)
    assert np.allclose(np.asarray(image, dtype=np.float64), (255, 0, 0), atol=3)


def test_decode_animated_gif_gives_first_frame(tmp_path):
    frames = [Image.new("RGB", (6, 4), color) for color in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=50, loop=0)
    with Image.open(path) as raw:
        assert raw.n_frames == 3
    image = decode_image(path)
    assert image.mode == "RGB" and image.size == (6, 4)
    assert (np.asarray(image) == (255, 0, 0)).all()


def test_decode_garbage_raises(tmp_path):
    path = tmp_path / "text.jpg"
    path.write_text("definitely not a jpeg")
    with pytest.raises(Exception):
        decode_image(path)


# ---------------------------------------------------------------------------------------------------------------
# ImageFolderDataset, collate, make_loader


@pytest.fixture
def mixed_folder(tmp_path):
    root = tmp_path / "mixed"
    save(root / "a_cls" / "good1.jpg", noise(50, 40, 1), quality=90)
    save(root / "a_cls" / "good2.png", noise(33, 61, 2))
    (root / "a_cls" / "zero.jpg").write_bytes(b"")
    save(root / "b_cls" / "good3.jpg", noise(70, 50, 3), quality=90)
    (root / "b_cls" / "text.jpg").write_text("hello, I am a text file\n")
    full = save(tmp_path / "whole.jpg", noise(64, 64, 4), quality=95).read_bytes()
    (root / "b_cls" / "trunc.jpg").write_bytes(full[: len(full) // 2])
    save(root / "top.png", noise(40, 40, 5))
    return root


MIXED_PATHS = ["a_cls/good1.jpg", "a_cls/good2.png", "a_cls/zero.jpg", "b_cls/good3.jpg", "b_cls/text.jpg",
               "b_cls/trunc.jpg", "top.png"]
GOOD = [0, 1, 3, 6]
BAD = [2, 4, 5]


def test_dataset_items_and_failures(mixed_folder):
    scan = scan_folder(mixed_folder, EXTS)
    assert scan.paths == MIXED_PATHS
    pre = Preprocess(resize=40, crop=32)
    dataset = ImageFolderDataset(scan, pre)
    assert len(dataset) == 7
    for i in GOOD:
        item = dataset[i]
        assert item["index"] == i and item["error"] is None
        assert item["image"].dtype == torch.uint8 and item["image"].shape == (3, 32, 32)
    for i in BAD:
        item = dataset[i]
        assert item["index"] == i and item["image"] is None
        assert isinstance(item["error"], str) and item["error"]
    assert dataset[5]["error"].startswith("OSError: image file is truncated")
    assert dataset[2]["error"].startswith("UnidentifiedImageError")
    assert dataset[4]["error"].startswith("UnidentifiedImageError")

    subset = ImageFolderDataset(scan, pre, indices=[6, 2])
    assert len(subset) == 2
    assert subset[0]["index"] == 6 and subset[0]["image"] is not None
    assert subset[1]["index"] == 2 and subset[1]["image"] is None


def test_collate_all_failed_batch():
    batch = collate([{"index": 4, "image": None, "error": "boom"}, {"index": 5, "image": None, "error": "bang"}])
    assert isinstance(batch, RawBatch)
    assert batch.images.shape == (0, 3, 0, 0) and batch.images.dtype == torch.uint8
    assert batch.indices.shape == (0,) and batch.indices.dtype == torch.int64
    assert batch.failed == [(4, "boom"), (5, "bang")]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_loader_never_dies_on_bad_files(mixed_folder, num_workers):
    scan = scan_folder(mixed_folder, EXTS)
    pre = Preprocess(resize=40, crop=32)
    loader = make_loader(ImageFolderDataset(scan, pre), batch_size=2, num_workers=num_workers, pin_memory=False)
    indices, failed, images, sizes = [], [], [], []
    for batch in loader:
        assert isinstance(batch, RawBatch)
        assert batch.images.dtype == torch.uint8
        assert batch.indices.dtype == torch.int64
        assert batch.images.shape[0] == batch.indices.shape[0]
        sizes.append(batch.indices.numel() + len(batch.failed))
        indices.extend(batch.indices.tolist())
        images.extend(batch.images.unbind(0))
        failed.extend(batch.failed)
    del loader
    assert sizes == [2, 2, 2, 1]  # ordered, unshuffled batches of the sorted list
    assert indices == GOOD  # each good image exactly once, in sorted order
    assert [i for i, _ in failed] == BAD
    assert all(isinstance(reason, str) and reason for _, reason in failed)
    for index, image in zip(indices, images):
        assert image.shape == (3, 32, 32)
        expected = pre.to_uint8(decode_image(mixed_folder / MIXED_PATHS[index]))
        assert torch.equal(image, expected), MIXED_PATHS[index]


# ---------------------------------------------------------------------------------------------------------------
# Preprocess against torchvision's own transform


@pytest.mark.parametrize("weights", [
    torchvision.models.ResNet18_Weights.DEFAULT,  # bilinear, 256 -> 224
    torchvision.models.EfficientNet_B0_Weights.DEFAULT,  # bicubic
    torchvision.models.Swin_T_Weights.DEFAULT,  # bicubic, 232 -> 224
])
@pytest.mark.parametrize("size", [(300, 257), (181, 400), (224, 224), (120, 90)])
def test_preprocess_matches_torchvision_transform(weights, size):
    reference = weights.transforms()
    pre = Preprocess.from_torchvision(reference)
    assert pre.interpolation == reference.interpolation.value
    assert (pre.resize, pre.crop) == (reference.resize_size[0], reference.crop_size[0])
    image = noise(*size, seed=sum(size))
    uint8 = pre.to_uint8(image)
    assert uint8.dtype == torch.uint8 and uint8.shape == (3, pre.crop, pre.crop)
    ours = pre.normalize(uint8.unsqueeze(0))[0]
    theirs = reference(image)
    assert ours.dtype == theirs.dtype == torch.float32
    assert ours.shape == theirs.shape
    # Given a PIL image, ImageClassification also resizes in PIL (uint8 result), centre-crops, pil_to_tensor, then
    # /255 and (x - mean) / std in float32: the same operations in the same order, so the results are bit-identical.
    assert torch.equal(ours, theirs), (ours - theirs).abs().max().item()


def test_preprocess_normalize_values():
    pre = Preprocess(mean=(0.5, 0.25, 0.0), std=(0.5, 0.25, 1.0))
    images = torch.tensor([0, 255, 51], dtype=torch.uint8).view(1, 3, 1, 1).expand(2, 3, 2, 2).contiguous()
    out = pre.normalize(images)
    assert out.shape == (2, 3, 2, 2) and out.dtype == torch.float32
    assert torch.allclose(out[:, 0], torch.full((2, 2, 2), -1.0))
    assert torch.allclose(out[:, 1], torch.full((2, 2, 2), 3.0))
    assert torch.allclose(out[:, 2], torch.full((2, 2, 2), 0.2))
    assert pre.normalize(images, dtype=torch.float64).dtype == torch.float64
