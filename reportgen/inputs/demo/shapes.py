"""Deterministic synthetic "shapes" image folder for the offline demo.

Six shape classes drawn with random pose and colour on noisy gradient backgrounds:
hard enough that the report shows real mistakes, easy enough for a small CNN.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

# Sorted, so the index of a class equals its index in torchvision's ImageFolder.
CLASS_NAMES: tuple[str, ...] = ("circle", "cross", "ring", "square", "star", "triangle")

DEMO_FOLDER_NAME = "demo_shapes_v1"
_SUPERSAMPLE = 4  # the shape mask is drawn this many times larger, then downsampled (anti-aliasing)
_CONTRAST_RANGE = (45.0, 110.0)  # wanted RGB distance between fill colour and background gradient


def _unit_outline(class_name: str, rng: np.random.Generator) -> list[np.ndarray]:
    """Polygons of a shape centred at 0 with outer radius 1; a second polygon is a hole."""
    if class_name in ("circle", "ring"):
        angles = np.linspace(0, 2 * np.pi, 72, endpoint=False)
        circle = np.stack([np.cos(angles), np.sin(angles)], axis=1)  # (72, 2)
        if class_name == "circle":
            return [circle]
        return [circle, circle * rng.uniform(0.45, 0.65)]
    if class_name == "square":
        angles = np.pi / 4 + np.arange(4) * np.pi / 2
        return [np.stack([np.cos(angles), np.sin(angles)], axis=1)]  # (4, 2)
    if class_name == "triangle":
        angles = np.pi / 2 + np.arange(3) * 2 * np.pi / 3
        return [np.stack([np.cos(angles), np.sin(angles)], axis=1)]  # (3, 2)
    if class_name == "star":
        angles = np.pi / 2 + np.arange(10) * np.pi / 5
        radii = np.where(np.arange(10) % 2 == 0, 1.0, rng.uniform(0.38, 0.5))
        return [np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1)]  # (10, 2)
    if class_name == "cross":
        w = rng.uniform(0.25, 0.35)  # half-width of an arm
        arm = [(w, 1), (w, w), (1, w), (1, -w), (w, -w), (w, -1),
               (-w, -1), (-w, -w), (-1, -w), (-1, w), (-w, w), (-w, 1)]
        return [np.array(arm, dtype=float)]  # (12, 2)
    raise ValueError(f"unknown shape class {class_name!r}; expected one of {CLASS_NAMES}")


def _distance_to_segment(p: np.ndarray, a: np.ndarray, b: np.ndarray) -> float:
    """Euclidean distance from colour p to the colour segment a-b (the gradient's colours)."""
    ab = b - a
    t = float(np.clip(np.dot(p - a, ab) / max(float(np.dot(ab, ab)), 1e-9), 0.0, 1.0))
    return float(np.linalg.norm(p - (a + t * ab)))


def _background(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A linear colour gradient in a random direction; returns (image, colour0, colour1)."""
    c0, c1 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    angle = rng.uniform(0, 2 * np.pi)
    ys, xs = np.mgrid[0:size, 0:size] / max(size - 1, 1)  # (H, W) each
    t = xs * np.cos(angle) + ys * np.sin(angle)  # (H, W)
    t = (t - t.min()) / max(float(np.ptp(t)), 1e-9)
    return c0 + t[..., None] * (c1 - c0), c0, c1  # (H, W, 3)


def _draw_distractors(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Overlay a few faint thin lines and dots, as clutter that is not the object."""
    size = image.width
    overlay = Image.new("RGBA", image.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(overlay)
    for _ in range(rng.integers(1, 4)):
        x0, y0, x1, y1 = rng.uniform(0, size, 4)
        colour = tuple(int(c) for c in rng.integers(0, 256, 3)) + (int(rng.integers(30, 80)),)
        draw.line([(x0, y0), (x1, y1)], fill=colour, width=int(rng.integers(1, 3)))
    for _ in range(rng.integers(2, 8)):
        x, y = rng.uniform(0, size, 2)
        r = rng.uniform(0.5, 2.5)
        colour = tuple(int(c) for c in rng.integers(0, 256, 3)) + (int(rng.integers(40, 100)),)
        draw.ellipse([x - r, y - r, x + r, y + r], fill=colour)
    return Image.alpha_composite(image.convert("RGBA"), overlay).convert("RGB")


def render_shape(class_name: str, rng: np.random.Generator, size: int = 96) -> Image.Image:
    """Render one RGB image of `class_name` with random pose, colour, background and noise."""
    background, c0, c1 = _background(rng, size)
    image = _draw_distractors(Image.fromarray(background.astype(np.uint8)), rng)

    # Pose: outer diameter 35-75% of the image, mild aspect change, any rotation.
    radius = rng.uniform(0.35, 0.75) * size / 2
    centre = rng.uniform(radius * 0.9, size - radius * 0.9, 2)
    aspect = np.array([rng.uniform(0.85, 1.15), 1.0])
    theta = rng.uniform(0, 2 * np.pi)
    rotation = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])

    big = size * _SUPERSAMPLE
    mask = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(mask)
    for k, polygon in enumerate(_unit_outline(class_name, rng)):
        points = (polygon * aspect) @ rotation.T * radius + centre  # (P, 2) in pixels
        draw.polygon([tuple(p) for p in points * _SUPERSAMPLE], fill=255 if k == 0 else 0)
    alpha = np.asarray(mask.resize((size, size), Image.Resampling.BOX), dtype=float)[..., None] / 255.0  # (H, W, 1)

    # Fill colour: the first candidate at least as contrasting as a random target (some images
    # are low-contrast on purpose), else the most contrasting candidate seen.
    wanted = rng.uniform(*_CONTRAST_RANGE)
    best, best_contrast = None, -1.0
    for _ in range(20):
        candidate = rng.uniform(0, 255, 3)
        contrast = _distance_to_segment(candidate, c0, c1)
        if contrast > best_contrast:
            best, best_contrast = candidate, contrast
        if contrast >= wanted:
            break

    pixels = np.asarray(image, dtype=float) * (1 - alpha) + best * alpha  # (H, W, 3)
    pixels += rng.normal(0.0, rng.uniform(4.0, 14.0), pixels.shape)
    return Image.fromarray(np.clip(pixels, 0, 255).round().astype(np.uint8))


def _write_broken_files(folder: Path) -> None:
    """Add two unreadable files, as a real folder may hold, for the report's failed-file ledger."""
    valid_jpeg = (folder / "square" / "square_000.jpg").read_bytes()
    (folder / "square" / "corrupt_truncated.jpg").write_bytes(valid_jpeg[:200])
    (folder / "circle" / "notes.jpg").write_text(
        "Notes on the shapes demo: this is a text file with a .jpg name, not an image.\n"
    )


def generate_shapes_folder(root: Path, per_class: int = 40, seed: int = 0, size: int = 96) -> Path:
    """Write a shapes image folder `root/<class>/<class>_<i:03d>.jpg` (every 10th one .png).

    Deterministic for a given seed: image i of class c uses its own generator seeded with
    (seed, c, i). The folder is built in a sibling temp directory and moved into place with
    os.replace, so an interrupted run never leaves a half-written `root`. Raises
    FileExistsError if `root` already exists and is not an empty directory.
    """
    root = Path(root)
    if per_class < 1:
        raise ValueError(f"per_class must be at least 1, got {per_class}")
    if root.exists() and not (root.is_dir() and not any(root.iterdir())):
        raise FileExistsError(f"{root} already exists; remove it first or choose another path")
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=root.parent))
    try:
        for class_index, class_name in enumerate(CLASS_NAMES):
            (tmp / class_name).mkdir()
            for i in range(per_class):
                rng = np.random.default_rng([seed, class_index, i])
                image = render_shape(class_name, rng, size=size)
                if i % 10 == 9:
                    image.save(tmp / class_name / f"{class_name}_{i:03d}.png")
                else:
                    image.save(tmp / class_name / f"{class_name}_{i:03d}.jpg", quality=90)
        _write_broken_files(tmp)
        os.chmod(tmp, 0o755)  # mkdtemp makes it owner-only
        try:
            os.replace(tmp, root)
        except OSError as error:  # another process created `root` meanwhile
            raise FileExistsError(f"{root} appeared while it was being generated") from error
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return root


def ensure_demo_folder(cache_dir: Path | None = None) -> Path:
    """Return the demo shapes folder, generating it (40 per class, seed 0) on first use.

    Location: `cache_dir/demo_shapes_v1` if given, else
    `$XDG_CACHE_HOME/reportgen/demo_shapes_v1` (default `~/.cache/reportgen/demo_shapes_v1`).
    """
    if cache_dir is None:
        xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
        cache_dir = Path(xdg) / "reportgen"
    root = Path(cache_dir) / DEMO_FOLDER_NAME
    if not root.is_dir():
        try:
            generate_shapes_folder(root, per_class=40, seed=0)
        except FileExistsError:
            if not root.is_dir():  # something other than a concurrent generator is in the way
                raise
    return root
