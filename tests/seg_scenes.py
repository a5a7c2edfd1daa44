"""Segmentation test data: scenes of coloured rectangles with their class masks (index and palette PNGs, a missing,
a wrong-size and an out-of-range mask), a 4-class LR-ASPP whose predictions vary, and a tiny SegFormer folder."""
from pathlib import Path

import numpy as np
import torch
from PIL import Image

CLASSES = 4
# (relative path, (height, width), mask: "L" | "P" | None (no mask file) | "small" (wrong size) | "out" (value 9))
IMAGES = [("a.jpg", (60, 80), "L"), ("b.png", (60, 80), "P"), ("nested/c d é.jpg", (80, 60), "L"),
          ("nested/e.jpg", (50, 50), None), ("f.jpg", (60, 80), "small"), ("g.jpg", (45, 70), "out"),
          ("h.jpg", (45, 70), "L")]
PALETTE = [128, 128, 128, 220, 30, 30, 30, 200, 40, 20, 40, 230] + [255, 255, 255] * 252


def scene(size, seed):
    """A grey image with a red, a green and a blue rectangle, and its class mask (0 grey, 1 red, 2 green, 3 blue,
    a 255 (ignored) border on the rectangles' edges)."""
    rng = np.random.default_rng(seed)
    height, width = size
    image = np.full((height, width, 3), 128, dtype=np.uint8)
    mask = np.zeros((height, width), dtype=np.uint8)
    for cls, colour in enumerate([(220, 30, 30), (30, 200, 40), (20, 40, 230)], start=1):
        top, left = rng.integers(0, height // 2), rng.integers(0, width // 2)
        bottom, right = top + rng.integers(8, height // 2), left + rng.integers(8, width // 2)
        image[top:bottom, left:right] = colour
        mask[top:bottom, left:right] = cls
        mask[top, left:right] = 255
    noise = rng.integers(-20, 20, image.shape)
    return np.clip(image.astype(int) + noise, 0, 255).astype(np.uint8), mask


def make_seg_folder(root: Path) -> Path:
    """`root/images` and `root/masks` for IMAGES; returns root."""
    for seed, (name, size, kind) in enumerate(IMAGES):
        image, mask = scene(size, seed)
        (root / "images" / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(root / "images" / name, quality=95)
        target = (root / "masks" / name).with_suffix(".png")
        target.parent.mkdir(parents=True, exist_ok=True)
        if kind == "L":
            Image.fromarray(mask, mode="L").save(target)
        elif kind == "P":
            indexed = Image.fromarray(mask, mode="P")
            indexed.putpalette(PALETTE)
            indexed.save(target)
        elif kind == "small":
            Image.fromarray(mask[:-4], mode="L").save(target)
        elif kind == "out":
            mask[0, 0] = 9
            Image.fromarray(mask, mode="L").save(target)
    return root


def save_calibrated_lraspp(path: Path) -> Path:
    """A 4-class LR-ASPP with random weights whose BN statistics are those of the scenes and whose head is spread
    out, so its predictions vary over the image (a freshly built one predicts one class everywhere)."""
    from torchvision.models.segmentation import lraspp_mobilenet_v3_large

    torch.manual_seed(0)
    model = lraspp_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=CLASSES)
    scenes = torch.stack([torch.from_numpy(scene((120, 160), seed)[0]).permute(2, 0, 1) for seed in range(8)])
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.momentum = None  # a cumulative average over the calibration forward
            module.reset_running_stats()
    model.train()
    with torch.no_grad():
        model((scenes.float() / 255 - 0.45) / 0.225)
        for head in (model.classifier.low_classifier, model.classifier.high_classifier):
            head.weight.normal_(0, 1.0)
    torch.save(model.state_dict(), path)
    return path


def save_tiny_segformer(folder: Path):
    """A random 4-class SegFormer with its processor (64 x 64, no crop) saved to `folder`; returns the model."""
    import transformers

    config = transformers.SegformerConfig(num_encoder_blocks=2, depths=[1, 1], sr_ratios=[2, 1], hidden_sizes=[8, 16],
                                          patch_sizes=[7, 3], strides=[4, 2], num_attention_heads=[1, 2],
                                          mlp_ratios=[2, 2], decoder_hidden_size=16, num_labels=CLASSES,
                                          id2label={i: n for i, n in enumerate(["bg", "red", "green", "blue"])},
                                          architectures=["SegformerForSemanticSegmentation"])
    torch.manual_seed(0)
    model = transformers.SegformerForSemanticSegmentation(config).eval()
    model.save_pretrained(folder)
    transformers.SegformerImageProcessor(size={"height": 64, "width": 64}).save_pretrained(folder)
    return model


