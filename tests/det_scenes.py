"""Detection test data: images of coloured rectangles of several sizes with their boxes written as COCO, YOLO and
Pascal VOC annotations, and a Faster R-CNN checkpoint whose random head gives spread-out scores."""
import json
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np
import torch
from PIL import Image

CATEGORIES = [(1, "person"), (3, "car"), (18, "dog")]  # COCO's ids, as torchvision's label ids hold them
# (relative path, (height, width)); the last one has no annotation
# (PNG: the hand-made detector finds the rectangles by their exact colour)
DET_IMAGES = [("a.png", (120, 160)), ("b.png", (120, 160)), ("sub/c.png", (160, 120)), ("sub/d.png", (100, 100)),
              ("e.png", (90, 140))]
UNLABELLED = "e.png"


def det_boxes(seed: int, size: Tuple[int, int]) -> List[Tuple[int, List[int]]]:
    """Two or three (category id, [x, y, w, h]) integer boxes inside an image of `size`."""
    rng = np.random.default_rng(seed)
    height, width = size
    boxes = []
    for _ in range(2 + seed % 2):
        w, h = int(rng.integers(15, width // 2)), int(rng.integers(15, height // 2))
        x, y = int(rng.integers(0, width - w)), int(rng.integers(0, height - h))
        boxes.append((CATEGORIES[int(rng.integers(0, 3))][0], [x, y, w, h]))
    return boxes


def make_det_folder(root: Path) -> Path:
    """root/images, root/instances.json (COCO, with its own image ids), root/yolo (labels + data.yaml),
    root/voc (Annotations xml); returns root."""
    images, annotations = [], []
    for seed, (name, size) in enumerate(DET_IMAGES):
        height, width = size
        pixels = np.full((height, width, 3), 110, dtype=np.uint8)
        boxes = det_boxes(seed, size)
        for cid, (x, y, w, h) in boxes:
            pixels[y:y + h, x:x + w] = colour(cid)
        (root / "images" / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(root / "images" / name)
        if name == UNLABELLED:
            continue
        image_id = 500 + seed
        images.append({"id": image_id, "file_name": name, "height": height, "width": width})
        for cid, box in boxes:
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": cid,
                                "bbox": [float(v) for v in box], "area": float(box[2] * box[3]), "iscrowd": 0})
        write_yolo(root / "yolo", name, size, boxes)
        write_voc(root / "voc", name, size, boxes)
    (root / "instances.json").write_text(json.dumps({
        "images": images, "annotations": annotations,
        "categories": [{"id": c, "name": n} for c, n in CATEGORIES]}))
    names = "\n".join(f"  {i}: {n}" for i, (_, n) in enumerate(CATEGORIES))
    (root / "yolo" / "data.yaml").write_text(f"names:\n{names}\n")
    return root


def write_yolo(folder: Path, name: str, size: Tuple[int, int], boxes) -> None:
    height, width = size
    index = {c: i for i, (c, _) in enumerate(CATEGORIES)}
    lines = [f"{index[c]} {(x + w / 2) / width:.10f} {(y + h / 2) / height:.10f} {w / width:.10f} {h / height:.10f}"
             for c, (x, y, w, h) in boxes]
    target = (folder / name).with_suffix(".txt")
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text("\n".join(lines) + "\n")


def write_voc(folder: Path, name: str, size: Tuple[int, int], boxes) -> None:
    names: Dict[int, str] = dict(CATEGORIES)
    objects = "".join(f"<object><name>{names[c]}</name><difficult>0</difficult><bndbox><xmin>{x}</xmin>"
                      f"<ymin>{y}</ymin><xmax>{x + w}</xmax><ymax>{y + h}</ymax></bndbox></object>"
                      for c, (x, y, w, h) in boxes)
    target = (folder / name).with_suffix(".xml")
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(f"<annotation><filename>{Path(name).name}</filename><size><width>{size[1]}</width>"
                      f"<height>{size[0]}</height><depth>3</depth></size>{objects}</annotation>")


# a low cap, no score floor, and a small internal size with few proposals, so a random model is fast on a CPU
DETECTOR_KWARGS = {"box_score_thresh": 0.0, "box_detections_per_img": 8, "min_size": 160, "max_size": 200,
                   "rpn_pre_nms_top_n_test": 150, "rpn_post_nms_top_n_test": 40}


def build_detector():
    from torchvision.models.detection import fasterrcnn_mobilenet_v3_large_320_fpn

    return fasterrcnn_mobilenet_v3_large_320_fpn(weights=None, weights_backbone=None, **DETECTOR_KWARGS)


def save_spread_detector(path: Path) -> Path:
    """A random Faster R-CNN whose class scores are spread out (a fresh one gives every box the same score) and
    favour the classes of CATEGORIES."""
    torch.manual_seed(0)
    model = build_detector()
    with torch.no_grad():
        model.roi_heads.box_predictor.cls_score.weight.normal_(0, 0.5)
        model.roi_heads.box_predictor.cls_score.bias.normal_(0, 1.0)
        model.roi_heads.box_predictor.cls_score.bias[[c for c, _ in CATEGORIES]] += 4.0  # mostly their classes
    torch.save(model.state_dict(), path)
    return path


def colour(cid: int) -> Tuple[int, int, int]:
    """The colour a rectangle of category `cid` is painted in."""
    return (40 * cid) % 255, 200 - 5 * cid, 60 + 3 * cid


class ColourBoxDetector(torch.nn.Module):
    """A hand-made detector of the scenes above: per category, the bounding box of the pixels of its colour (score
    0.9; two rectangles of one class become one box, a covered one a smaller box), plus one fixed false positive of
    the first category (score 0.3) per image. Takes (B, 3, H, W) in [0, 1]; returns torchvision's list of dicts.
    Real mistakes, so the metrics are neither 0 nor 1 and every id and box convention shows in them."""

    def __init__(self):
        super().__init__()
        self.tolerance = torch.nn.Parameter(torch.tensor(2.5 / 255), requires_grad=False)
        self.colours = torch.tensor([colour(c) for c, _ in CATEGORIES], dtype=torch.float32) / 255  # (K, 3)
        self.class_names = ["__background__"] + [""] * 99
        for cid, name in CATEGORIES:
            self.class_names[cid] = name

    def forward(self, images: torch.Tensor):
        found = []
        for image in images:  # (3, H, W)
            boxes, scores, labels = [], [], []
            for (cid, _), rgb in zip(CATEGORIES, self.colours):
                mask = ((image - rgb[:, None, None]).abs() <= self.tolerance).all(dim=0)  # (H, W)
                if mask.any():
                    rows, cols = torch.nonzero(mask.any(dim=1)).flatten(), torch.nonzero(mask.any(dim=0)).flatten()
                    boxes.append(torch.stack([cols[0], rows[0], cols[-1] + 1, rows[-1] + 1]).float())
                    scores.append(0.9)
                    labels.append(cid)
            boxes.append(torch.tensor([2.0, 2.0, 22.0, 22.0]))
            scores.append(0.3)
            labels.append(CATEGORIES[0][0])
            found.append({"boxes": torch.stack(boxes), "scores": torch.tensor(scores),
                          "labels": torch.tensor(labels, dtype=torch.int64)})
        return found


def colour_box_detector() -> ColourBoxDetector:
    return ColourBoxDetector()


def save_tiny_detr(folder: Path):
    """A random DETR (ResNet backbone built from its config, nothing fetched) with 10 queries and a 64 / 96 px
    processor, whose labels are COCO's ids of CATEGORIES; returns the model."""
    import transformers

    id2label = {i: "N/A" for i in range(19)}
    id2label.update({c: n for c, n in CATEGORIES})
    config = transformers.DetrConfig(
        use_timm_backbone=False, use_pretrained_backbone=False, num_queries=10, d_model=16, encoder_layers=1,
        decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=16,
        decoder_ffn_dim=16, id2label=id2label, architectures=["DetrForObjectDetection"],
        backbone_config=transformers.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16, 16, 16], depths=[1, 1, 1, 1],
                                                  out_features=["stage4"]))
    torch.manual_seed(0)
    model = transformers.DetrForObjectDetection(config).eval()
    with torch.no_grad():
        model.class_labels_classifier.bias[[c for c, _ in CATEGORIES]] += 3.0  # mostly the scenes' classes
    model.save_pretrained(folder)
    transformers.DetrImageProcessor(size={"shortest_edge": 64, "longest_edge": 96}).save_pretrained(folder)
    return model
