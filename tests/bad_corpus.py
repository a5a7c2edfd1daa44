"""A folder with everything a real photo folder throws at a tool: broken files, odd formats and modes, odd names,
links and loops. `build_corpus` returns the folder plus which relative paths must be processed and which listed."""
from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Dict, Set, Tuple

import numpy as np
from PIL import Image


def _rgb(seed: int, size=(40, 30)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))


def build_corpus(root: Path) -> Tuple[Path, Set[str], Dict[str, str]]:
    """(root, paths that must decode, {path: words the failure reason must contain})."""
    good: Set[str] = set()
    bad: Dict[str, str] = {}
    cats, dogs = root / "cats", root / "dogs"
    cats.mkdir(parents=True)
    dogs.mkdir()
    (root / "empty_class").mkdir()

    def save(rel: str, image: Image.Image, fmt: str, **kwargs) -> None:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path, format=fmt, **kwargs)
        good.add(rel)

    save("cats/plain.jpg", _rgb(0), "JPEG")
    save("cats/UPPER.JPG", _rgb(1), "JPEG")
    save("cats/png_named.jpg", _rgb(2), "PNG")  # a PNG behind a .jpg name: decoded by content
    save("cats/gray16.png", Image.fromarray((np.arange(1200, dtype=np.uint16).reshape(30, 40) * 50)), "PNG")
    save("cats/cmyk.jpg", _rgb(3).convert("CMYK"), "JPEG")
    save("cats/rgba.png", _rgb(4).convert("RGBA"), "PNG")
    save("cats/palette.png", _rgb(5).convert("P"), "PNG")
    frames = [_rgb(6 + i) for i in range(3)]
    path = cats / "animated.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=50)
    good.add("cats/animated.gif")
    frames[0].save(cats / "pages.tiff", save_all=True, append_images=frames[1:])
    good.add("cats/pages.tiff")
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees when shown
    save("cats/rotated.jpg", _rgb(9, (48, 24)), "JPEG", exif=exif)
    save("cats/photo.webp", _rgb(10), "WEBP")
    save("cats/bitmap.bmp", _rgb(11), "BMP")
    save("cats/Ünïcödé 猫.png", _rgb(12), "PNG")
    save('dogs/"><b>html<b>.png', _rgb(13), "PNG")
    save("dogs/a/b/c/d/e/deep.png", _rgb(14), "PNG")
    save("dogs/tiny_1x1.png", _rgb(15, (1, 1)), "PNG")
    save("dogs/grayscale.jpg", _rgb(16).convert("L"), "JPEG")
    save("root_level.png", _rgb(17), "PNG")  # outside any class folder: unlabelled

    (cats / "zero.jpg").write_bytes(b"")
    bad["cats/zero.jpg"] = "cannot identify"
    data = io.BytesIO()
    _rgb(18, (200, 150)).save(data, format="JPEG")
    (cats / "truncated.jpg").write_bytes(data.getvalue()[:300])
    bad["cats/truncated.jpg"] = "truncated"
    (dogs / "notes.jpg").write_text("this is a text file with an image name")
    bad["dogs/notes.jpg"] = "cannot identify"
    Image.new("L", (1300, 1000)).save(dogs / "bomb.png")  # over the test's dataset.max_pixels
    bad["dogs/bomb.png"] = "decompression bomb"
    os.symlink(root / "dogs" / "missing.png", dogs / "dangling.png")
    bad["dogs/dangling.png"] = "broken link"

    (cats / ".hidden.jpg").write_bytes(b"hidden files are skipped")
    (root / ".thumbnails").mkdir()
    _rgb(19).save(root / ".thumbnails" / "t.png")
    (cats / "readme.txt").write_text("not scanned: not an image extension")
    (dogs / "folder.jpg").mkdir()  # a folder with an image suffix is walked, not opened
    os.symlink(root / "dogs", dogs / "a" / "loop")  # a symlink loop: dogs/a/loop -> dogs
    bad["dogs/a/loop"] = "already scanned"
    os.mkfifo(dogs / "pipe.jpg")  # opening a FIFO would block forever
    bad["dogs/pipe.jpg"] = "not a regular file"
    return root, good, bad
