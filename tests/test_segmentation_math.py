"""Semantic segmentation building blocks: ground-truth masks (reportgen.inputs.masks), the metrics against
brute-force pixel loops and hand-made confusions (reportgen.analyses._segmentation_math), and the drawing of class
maps (reportgen.report.segmentation_overlays)."""
from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from reportgen.analyses._segmentation_math import (confusion, image_scores, metrics, predicted_shares,
                                                   upsample_argmax)
from reportgen.errors import ConfigError
from reportgen.inputs.masks import MaskFolder
from reportgen.report.segmentation_overlays import (IGNORE_COLOUR, blend, class_colours, colourise, legend,
                                                    resize_mask)


# ---------------------------------------------------------------- upsample_argmax

def plain_upsample_argmax(logits: torch.Tensor, size) -> torch.Tensor:
    resized = F.interpolate(logits.float()[None], size=size, mode="bilinear", align_corners=False)[0]  # (K, H, W)
    return resized.argmax(dim=0)


@pytest.mark.parametrize("classes, chunk, size", [(21, 4, (37, 50)), (21, 16, (64, 48)), (5, 16, (9, 13)),
                                                  (19, 1, (20, 31)), (8, 8, (16, 16))])
def test_upsample_argmax_chunks_equal_the_whole_tensor(classes, chunk, size):
    torch.manual_seed(classes + chunk)
    logits = torch.randn(classes, 7, 9)
    labels = upsample_argmax(logits, size, chunk=chunk)
    assert labels.dtype == torch.int64 and labels.shape == size
    assert torch.equal(labels, plain_upsample_argmax(logits, size))


def test_upsample_argmax_ties_go_to_the_first_class_as_torch_argmax():
    torch.manual_seed(0)
    logits = torch.randn(11, 6, 5)
    logits[7] = logits[2]  # identical maps in different chunks: class 2 must win everywhere it is the maximum
    logits[3] = logits[2]  # and within one chunk
    logits[10] = logits[9]
    logits[:, 0, 0] = 1.0  # a pixel where every class ties (and its neighbours partly)
    for chunk in (1, 2, 3, 4, 16):
        labels = upsample_argmax(logits, (17, 12), chunk=chunk)
        assert torch.equal(labels, plain_upsample_argmax(logits, (17, 12)))
    assert not (labels == 7).any() and not (labels == 3).any() and not (labels == 10).any()
    assert labels[0, 0] == 0


def test_upsample_argmax_nan_counts_as_the_maximum_like_torch_argmax():
    logits = torch.zeros(6, 4, 4)
    logits[4, 1, 1] = float("nan")
    logits[5] = 3.0
    for chunk in (1, 2, 4):
        assert torch.equal(upsample_argmax(logits, (8, 8), chunk=chunk), plain_upsample_argmax(logits, (8, 8)))


def test_upsample_argmax_computes_half_logits_in_float32():
    torch.manual_seed(1)
    logits = torch.randn(10, 5, 5).half()
    assert torch.equal(upsample_argmax(logits, (11, 7), chunk=3), plain_upsample_argmax(logits.float(), (11, 7)))


def test_upsample_argmax_refuses_a_batch():
    with pytest.raises(ValueError, match=r"\(K, h, w\)"):
        upsample_argmax(torch.zeros(1, 3, 4, 4), (8, 8))


# ---------------------------------------------------------------- confusion

def brute_confusion(target: np.ndarray, pred: np.ndarray, k: int, ignore_index: int) -> np.ndarray:
    out = np.zeros((k, k), dtype=np.int64)
    for t, p in zip(target.ravel().tolist(), pred.ravel().tolist()):
        if 0 <= t < k and t != ignore_index:
            out[t, p] += 1
    return out


@pytest.mark.parametrize("ignore_index", [255, -1, 2])
def test_confusion_equals_a_loop_over_every_pixel(ignore_index):
    rng = np.random.default_rng(ignore_index + 10)
    k = 5
    target = rng.integers(0, k, (23, 17))
    target[rng.random(target.shape) < 0.2] = ignore_index
    target[0, :3] = 7  # out of range but not the ignore index: not counted either (as torchvision's reference)
    pred = rng.integers(0, k, (23, 17))
    got = confusion(torch.from_numpy(target), torch.from_numpy(pred), k, ignore_index)
    assert got.dtype == torch.int64 and got.shape == (k, k)
    expected = brute_confusion(target, pred, k, ignore_index)
    assert np.array_equal(got.numpy(), expected)
    ignored = (target == ignore_index) | (target < 0) | (target >= k)
    assert got.sum() == (~ignored).sum()


def test_confusion_ignores_ignore_index_pixels_whatever_they_predict():
    target = torch.tensor([[0, 1], [255, 255]])
    pred = torch.tensor([[0, 0], [1, 1]])
    assert confusion(target, pred, 2, 255).tolist() == [[1, 0], [1, 0]]


def test_confusion_checks_shapes_and_predictions():
    with pytest.raises(ValueError, match="one shape"):
        confusion(torch.zeros(2, 3, dtype=torch.long), torch.zeros(3, 2, dtype=torch.long), 2, 255)
    with pytest.raises(ValueError, match="class indices"):
        confusion(torch.zeros(2, 2, dtype=torch.long), torch.full((2, 2), 2), 2, 255)


# ---------------------------------------------------------------- metrics

def test_metrics_on_a_hand_made_confusion():
    conf = np.array([[3, 1, 0],
                     [2, 4, 0],
                     [0, 0, 0]])  # class 2 never in the truth nor predicted
    m = metrics(conf)
    assert m["labelled_pixels"] == 10
    assert m["pixel_accuracy"] == pytest.approx(0.7)
    iou0, iou1 = 3 / (4 + 5 - 3), 4 / (6 + 5 - 4)
    assert m["per_class"][0] == {"iou": pytest.approx(iou0), "accuracy": pytest.approx(0.75), "pixels": 4,
                                 "predicted_pixels": 5}
    assert m["per_class"][1] == {"iou": pytest.approx(iou1), "accuracy": pytest.approx(4 / 6), "pixels": 6,
                                 "predicted_pixels": 5}
    assert m["per_class"][2] == {"iou": None, "accuracy": None, "pixels": 0, "predicted_pixels": 0}
    assert m["miou"] == pytest.approx((iou0 + iou1) / 2)  # the absent class does not count (torchvision: NaN)
    assert m["mean_accuracy"] == pytest.approx((0.75 + 4 / 6) / 2)
    assert m["fw_iou"] == pytest.approx(0.4 * iou0 + 0.6 * iou1)


def test_metrics_class_only_predicted_counts_in_miou_not_in_accuracy():
    conf = np.array([[2, 2],
                     [0, 0]])  # class 1 predicted, never true: IoU 0, accuracy undefined
    m = metrics(conf)
    assert m["per_class"][1] == {"iou": 0.0, "accuracy": None, "pixels": 0, "predicted_pixels": 2}
    assert m["miou"] == pytest.approx((0.5 + 0.0) / 2)
    assert m["mean_accuracy"] == pytest.approx(0.5)
    assert m["fw_iou"] == pytest.approx(0.5)


def test_metrics_agree_with_torchvisions_reference_compute_where_it_is_defined():
    rng = np.random.default_rng(3)
    conf = rng.integers(0, 50, (6, 6))
    h = torch.from_numpy(conf).float()  # torchvision references/segmentation/utils.py ConfusionMatrix.compute
    acc_global = torch.diag(h).sum() / h.sum()
    acc = torch.diag(h) / h.sum(1)
    iu = torch.diag(h) / (h.sum(1) + h.sum(0) - torch.diag(h))
    m = metrics(conf)
    assert m["pixel_accuracy"] == pytest.approx(acc_global.item(), rel=1e-6)
    assert [c["accuracy"] for c in m["per_class"]] == pytest.approx(acc.tolist(), rel=1e-6)
    assert [c["iou"] for c in m["per_class"]] == pytest.approx(iu.tolist(), rel=1e-6)
    assert m["miou"] == pytest.approx(iu.mean().item(), rel=1e-6)


def test_metrics_of_an_empty_confusion_are_none():
    m = metrics(np.zeros((3, 3), dtype=np.int64))
    assert m["labelled_pixels"] == 0
    assert all(m[key] is None for key in ("pixel_accuracy", "mean_accuracy", "miou", "fw_iou"))
    assert all(c["iou"] is None and c["accuracy"] is None for c in m["per_class"])


def test_image_scores():
    conf = np.array([[3, 1, 0, 0],
                     [2, 4, 0, 0],
                     [0, 0, 0, 0],
                     [0, 0, 0, 0]])
    target = np.array([0, 0, 0, 0, 1, 1, 1, 1, 1, 1])
    pred = np.array([0, 0, 0, 1, 0, 0, 1, 1, 1, 1])
    assert np.array_equal(brute_confusion(target, pred, 4, 255), conf)
    s = image_scores(conf)
    assert s["iou"] == pytest.approx((3 / 6 + 4 / 7) / 2)
    assert s["pixel_accuracy"] == pytest.approx(0.7)
    assert s["classes_present"] == [0, 1] and s["classes_predicted"] == [0, 1]
    assert s["false_positive"].tolist() == [2, 1, 0, 0]  # predicted 0 where truth is 1: twice
    assert s["false_negative"].tolist() == [1, 2, 0, 0]
    assert image_scores(np.zeros((4, 4)))["iou"] is None


def test_predicted_shares():
    pred = torch.tensor([[0, 2, 2], [2, 1, 0]])
    assert predicted_shares(pred, 4).tolist() == [2, 1, 3, 0]
    assert predicted_shares(pred, 4).dtype == torch.int64


# ---------------------------------------------------------------- masks

def write(path: Path, image: Image.Image) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path


def test_mask_folder_finds_the_mask_by_path_and_stem(tmp_path):
    folder = MaskFolder(tmp_path, 255, None, 3)
    assert folder.path_for("a/b.jpg") == tmp_path / "a" / "b.png"
    assert folder.path_for("a/b.c.JPEG") == tmp_path / "a" / "b.c.png"
    assert folder.path_for("caf\\xe9.jpg") == tmp_path / "caf\udce9.png"  # escaped name -> real name


def test_mask_folder_must_exist(tmp_path):
    with pytest.raises(ConfigError, match="dataset.masks"):
        MaskFolder(tmp_path / "nope", 255, None, 3)


@pytest.mark.parametrize("mapping, bad", [({1: 5}, "{1: 5}"), ({1: -2}, "{1: -2}"), ({-1: 0}, "{-1: 0}"),
                                          ({"1": 0}, "{'1': 0}")])
def test_mask_mapping_is_checked(tmp_path, mapping, bad):
    with pytest.raises(ConfigError, match="dataset.mask_mapping") as raised:
        MaskFolder(tmp_path, 255, mapping, 3)
    assert bad in str(raised.value)
    MaskFolder(tmp_path, 255, {1: 2, 2: 255, 7: 0}, 3)  # ignore_index is a valid target


def test_mask_modes_that_hold_class_ids(tmp_path):
    values = np.array([[0, 1, 2], [255, 1, 0]], dtype=np.uint8)
    write(tmp_path / "grey.png", Image.fromarray(values, "L"))
    palette = Image.fromarray(values, "P")
    palette.putpalette([255, 255, 255] * 256)  # every colour white: the index must be read, not the colour
    write(tmp_path / "pal.png", palette)
    write(tmp_path / "deep.png", Image.fromarray(values.astype(np.uint16)))
    write(tmp_path / "bits.png", Image.fromarray(values == 1))
    folder = MaskFolder(tmp_path, 255, None, 3)
    for name in ("grey", "pal", "deep"):
        read = folder.read(f"{name}.jpg", (2, 3))
        assert read.problem is None and not read.missing and not read.fatal, name
        assert read.mask.dtype == np.int64 and read.mask.tolist() == values.tolist(), name
    assert folder.read("bits.jpg", (2, 3)).mask.tolist() == (values == 1).astype(int).tolist()


def test_a_missing_mask_is_unlabelled_not_a_problem(tmp_path):
    read = MaskFolder(tmp_path, 255, None, 3).read("sub/none.jpg", (4, 4))
    assert read.missing and read.mask is None and read.problem is None and not read.fatal


def test_masks_that_cannot_be_used_say_why(tmp_path):
    write(tmp_path / "rgb.png", Image.new("RGB", (3, 2)))
    write(tmp_path / "small.png", Image.new("L", (3, 2)))
    write(tmp_path / "turned.png", Image.new("L", (2, 3)))
    Image.new("L", (3, 2)).save(tmp_path / "jpeg.png", format="JPEG")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    folder = MaskFolder(tmp_path, 255, None, 3)
    rgb = folder.read("rgb.jpg", (2, 3))
    assert rgb.fatal and rgb.mask is None and "'rgb.png'" in rgb.problem and "colour-coded" in rgb.problem
    assert "convert it to a palette PNG" in rgb.problem
    small = folder.read("small.jpg", (4, 6))
    assert small.fatal and "2x3" in small.problem and "4x6" in small.problem and "never resized" in small.problem
    assert "EXIF" in folder.read("turned.jpg", (2, 3)).problem
    jpeg = folder.read("jpeg.jpg", (2, 3))
    assert jpeg.fatal and "JPEG" in jpeg.problem and "'jpeg.png'" in jpeg.problem
    broken = folder.read("broken.jpg", (2, 3))
    assert broken.fatal and "'broken.png'" in broken.problem and "could not be read" in broken.problem
    assert str(tmp_path) not in broken.problem
    assert all(r.problem.endswith("the image is not scored") for r in (rgb, small, jpeg, broken))


def test_mask_values_outside_the_classes_are_ignored_with_a_warning(tmp_path):
    values = np.zeros((4, 5), dtype=np.uint8)
    values[0, :] = np.arange(10, 15)  # five values out of range, once each
    values[1, :] = np.arange(20, 25)
    values[2, 0] = 20
    values[3, 0] = 255  # the ignore index: fine
    values[3, 1] = 2
    write(tmp_path / "m.png", Image.fromarray(values))
    read = MaskFolder(tmp_path, 255, None, 3).read("m.jpg", (4, 5))
    assert read.mask is not None and not read.fatal and read.warning == read.problem
    assert set(np.unique(read.mask).tolist()) == {0, 2, 255}
    assert (read.mask[:2] == 255).all() and read.mask[2, 0] == 255 and read.mask[3, 1] == 2
    assert "11 pixels" in read.problem and "20 (2 px)" in read.problem and "10 (1 px)" in read.problem
    assert "and 2 more values" in read.problem and "'m.png'" in read.problem
    assert "23 (1 px)" not in read.problem  # only the first 8 values are listed
    assert "not scored" not in read.problem


def test_mask_mapping_is_applied_and_unmapped_values_ignored(tmp_path):
    values = np.array([[7, 8, 26], [0, 33, 7]], dtype=np.uint16)  # e.g. Cityscapes ids, 16-bit
    write(tmp_path / "city.png", Image.fromarray(values))
    read = MaskFolder(tmp_path, 255, {7: 0, 8: 1, 26: 2}, 3).read("city.jpg", (2, 3))
    assert read.problem is None
    assert read.mask.tolist() == [[0, 1, 2], [255, 255, 0]]


# ---------------------------------------------------------------- drawing

def test_class_colours_are_the_voc_colour_map():
    colours = class_colours(300)
    assert colours.dtype == np.uint8 and colours.shape == (300, 3)
    assert colours[:9].tolist() == [[0, 0, 0], [128, 0, 0], [0, 128, 0], [128, 128, 0], [0, 0, 128],
                                    [128, 0, 128], [0, 128, 128], [128, 128, 128], [64, 0, 0]]
    assert colours[15].tolist() == [192, 128, 128]  # VOC "person"
    assert colours[20].tolist() == [0, 64, 128]  # VOC "tvmonitor"
    assert colours[255].tolist() == [224, 224, 192]  # VOC void
    assert np.array_equal(colours[256:], colours[:44])  # cycles beyond 256
    assert len({tuple(c) for c in colours[:256]}) == 256
    assert not (colours == 255).all(axis=1).any()  # IGNORE_COLOUR is no class colour


def test_colourise():
    colours = class_colours(3)
    mask = np.array([[0, 1], [2, 255]])
    out = colourise(mask, colours, 255)
    assert out.dtype == np.uint8
    assert out.tolist() == [[[0, 0, 0], [128, 0, 0]], [[0, 128, 0], list(IGNORE_COLOUR)]]
    with pytest.raises(ValueError, match=r"\[3\]"):
        colourise(np.array([[3]]), colours, 255)


def test_blend():
    image = np.array([[[100, 0, 255], [10, 20, 30]]], dtype=np.uint8)
    coloured = np.array([[[200, 100, 255], [0, 0, 0]]], dtype=np.uint8)
    out = blend(image, coloured, alpha=0.5)
    assert out.dtype == np.uint8 and out.tolist() == [[[150, 50, 255], [5, 10, 15]]]
    out = blend(image, coloured, alpha=0.5, where=np.array([[True, False]]))
    assert out.tolist() == [[[150, 50, 255], [10, 20, 30]]]  # the second pixel untouched
    assert blend(image, coloured).tolist()[0][0] == [155, 55, 255]  # default alpha 0.55


def test_resize_mask_is_nearest_and_never_invents_ids():
    mask = np.arange(16).reshape(4, 4)
    assert resize_mask(mask, (2, 2)).tolist() == [[5, 7], [13, 15]]
    assert resize_mask(np.array([[1, 2], [3, 4]]), (4, 4)).tolist() == [[1, 1, 2, 2], [1, 1, 2, 2],
                                                                       [3, 3, 4, 4], [3, 3, 4, 4]]
    rng = np.random.default_rng(0)
    for (big_h, big_w), (h, w) in [((37, 50), (9, 13)), ((100, 7), (33, 3)), ((5, 5), (12, 17))]:
        mask = rng.integers(0, 300, (big_h, big_w))
        small = resize_mask(mask, (h, w))
        torch_nearest = F.interpolate(torch.from_numpy(mask)[None, None].double(), size=(h, w),
                                      mode="nearest-exact")[0, 0].long().numpy()
        assert small.shape == (h, w) and np.array_equal(small, torch_nearest)
        assert set(np.unique(small)) <= set(np.unique(mask))


def test_legend_swatches_hold_the_exact_class_colours():
    colours = class_colours(21)
    shown = [0, 1, 5, 15, 20]
    names = [f"class{i}" for i in range(20)]  # class 20 has no name: shown by id
    figure = legend(names, colours, shown, "legend", dpi=100)
    assert figure.format == "png" and figure.name == "legend"
    pixels = np.asarray(Image.open(io.BytesIO(figure.data)).convert("RGB"))  # (H, W, 3)
    assert (figure.height, figure.width) == pixels.shape[:2]
    flat = pixels.reshape(-1, 3)
    swatch_side = math.floor(0.16 * 100) - 1
    for class_id in shown:
        count = int((flat == colours[class_id]).all(axis=1).sum())
        assert count >= swatch_side ** 2, (class_id, count)
