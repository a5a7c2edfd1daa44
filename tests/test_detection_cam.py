"""Explanations of single detections (reportgen.analyses._detection_cam) against pytorch-grad-cam as the oracle:
box-score Grad-CAM vs its GradCAM + FasterRCNNBoxScoreTarget, EigenCAM vs its EigenCAM, on a random-weight
Faster R-CNN MobileNetV3 at 160 px; the default layer, finite maps of the right shape on RetinaNet and SSDlite;
renormalisation in a box, matching and cost accounting on hand-set numbers; hooks, mode and flags restored."""
import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from pytorch_grad_cam import EigenCAM, GradCAM
from pytorch_grad_cam.utils.model_targets import FasterRCNNBoxScoreTarget
from torchvision.models import detection
from torchvision.ops import box_iou

from reportgen.analyses._detection_cam import (SecondPassCost, box_score_cams, box_target, default_detection_layer,
                                               eigen_cams, first_component, renormalise_in_box)
from reportgen.engine.capture import count_hooks

SIDE = 160  # the 320 model resizes it to 320 x 320: a multiple of 32, so no padding and pytorch-grad-cam's maps
# (which never crop padding) cover the same pixels as ours


def correlation(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(np.ravel(a), np.ravel(b))[0, 1])


@pytest.fixture(scope="module")
def frcnn():
    """Random-weight Faster R-CNN MobileNetV3 (320) that outputs 5 boxes on `image`, with its detections."""
    torch.manual_seed(0)
    model = detection.fasterrcnn_mobilenet_v3_large_320_fpn(weights=None, weights_backbone=None,
                                                            box_detections_per_img=5, box_score_thresh=0.0)
    calibrate(model)
    image = torch.rand((3, SIDE, SIDE), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        found = model([image])[0]
    assert len(found["boxes"]) >= 3, "the random model must output boxes to explain"
    return model, image, found


def calibrate(model) -> None:
    """Untrained batch norms (running mean 0, variance 1) shrink MobileNet's features to ~1e-8 by the last stage,
    and every box then gets the same map: set their statistics from one batch of random images, and scale the box
    heads down so scores are not saturated (a softmax at 1.0 has no gradient) and boxes stay near the proposals."""
    for module in model.backbone.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.reset_running_stats()
            module.momentum = None  # the running statistics become this batch's
    model.backbone.train()
    with torch.no_grad():
        model.backbone(torch.rand((4, 3, 320, 320), generator=torch.Generator().manual_seed(5)))
        model.roi_heads.box_predictor.cls_score.weight.mul_(0.05)
        model.roi_heads.box_predictor.bbox_pred.weight.mul_(0.01)
        model.rpn.head.bbox_pred.weight.mul_(0.01)
    model.eval()


def test_default_layer_faster_rcnn_mobilenet(frcnn):
    model, _, _ = frcnn
    layer, why = default_detection_layer(model)
    assert layer == "backbone.body.16" and layer in why
    assert count_hooks(model) == 0 and not model.training


def test_default_layer_without_backbone():
    layer, why = default_detection_layer(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3)))
    assert layer is None and "backbone" in why


@pytest.mark.parametrize("iou_term", [True, False])
def test_box_score_gradcam_equals_pytorch_grad_cam(frcnn, iou_term):
    model, image, found = frcnn
    # shifted a little (IoU about 0.8 with the output boxes), so the IoU term has a gradient too (at IoU 1 it has none)
    boxes, labels = found["boxes"][:3] + torch.tensor([3.0, -2.0, 4.0, 1.0]), found["labels"][:3]
    cost = SecondPassCost()
    ours = box_score_cams(model, [image], [{"boxes": boxes, "labels": labels}], "backbone.body.16",
                          iou_term=iou_term, cost=cost)[0]
    assert len(ours) == 3 and cost.forwards == 1 and cost.backwards == 3 and cost.seconds > 0
    assert not cost.unmatched and not cost.zero_gradient
    theirs = []
    for box, label in zip(boxes, labels):
        target = (FasterRCNNBoxScoreTarget(labels=[label], bounding_boxes=[box.numpy()]) if iou_term
                  else ScoreOnly(box, int(label)))
        with GradCAM(model, target_layers=[model.backbone.body["16"]]) as cam:
            theirs.append(cam(image[None], targets=[target])[0])  # (H, W), min-max normalised
    model.zero_grad(set_to_none=True)
    for mine, reference in zip(ours, theirs):
        assert mine.shape == reference.shape == (SIDE, SIDE) and mine.dtype == np.float32
        assert mine.std() > 0 and reference.std() > 0  # a constant map would make the correlation meaningless
        assert correlation(mine, reference) >= 0.999
    # the comparison tells boxes apart: one box's map is not another's
    assert max(correlation(ours[i], theirs[j]) for i in range(3) for j in range(3) if i != j) < 0.99
    assert count_hooks(model) == 0 and all(p.requires_grad for p in model.parameters())


class ScoreOnly:
    """pytorch-grad-cam target: the score of the best-IoU output box of the same label (our iou_term=False)."""

    def __init__(self, box: torch.Tensor, label: int):
        self.box, self.label = box, label

    def __call__(self, output):
        same = output["labels"] == self.label
        ious = box_iou(self.box[None], output["boxes"][same])[0]
        return output["scores"][same][ious.argmax()]


def test_eigencam_equals_pytorch_grad_cam(frcnn):
    model, image, found = frcnn
    ours = eigen_cams(model, [image], "backbone.body.16")[0]
    with EigenCAM(model, target_layers=[model.backbone.body["16"]]) as cam:  # targets unused, but must be given
        theirs = cam(image[None], targets=[FasterRCNNBoxScoreTarget(found["labels"][:1], found["boxes"][:1])])[0]
    assert ours.shape == theirs.shape == (SIDE, SIDE)
    assert ours.std() > 0 and theirs.std() > 0
    assert correlation(ours, theirs) >= 0.999


def test_first_component_is_the_principal_axis():
    """A rank-one activation pattern: the projection is that pattern (up to the SVD's sign), centred."""
    pattern = np.arange(12, dtype=np.float32).reshape(3, 4)  # (h, w)
    directions = np.array([1.0, -2.0, 0.5], dtype=np.float32)  # (C,)
    acts = directions[:, None, None] * pattern[None] + 3.0  # (C, h, w)
    projection = first_component(acts)
    expected = (pattern - pattern.mean()) * np.linalg.norm(directions)
    assert np.allclose(np.abs(projection), np.abs(expected), atol=1e-4)
    assert abs(correlation(projection, expected)) > 0.9999
    corrected = first_component(-acts, sign_correction=True)
    assert abs(corrected.min()) <= abs(corrected.max())


def test_maps_at_each_image_size_with_padding(frcnn):
    """150 x 200 resizes to 320 x 427 and pads to 320 x 448: maps at the image's size, or capped by max_side."""
    model, _, _ = frcnn
    image = torch.rand((3, 150, 200), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        found = model([image])[0]
    wanted = [{"boxes": found["boxes"][:2], "labels": found["labels"][:2]}, {"boxes": [], "labels": []}]
    cost = SecondPassCost()
    maps = box_score_cams(model, [image, image[:, :40, :60]], wanted, "backbone.body.16", max_side=100, cost=cost)
    assert [m.shape for m in maps[0]] == [(75, 100)] * 2 and maps[1] == []
    assert all(np.isfinite(m).all() and m.min() >= 0 and m.max() > 0 for m in maps[0])
    assert cost.images == 1 and cost.forwards == 1 and cost.backwards == 2  # no forward for an image with nothing
    eigen = eigen_cams(model, [image, image[:, :40, :60]], "backbone.body.16", cost=cost)
    assert [m.shape for m in eigen] == [(150, 200), (40, 60)] and all(np.isfinite(m).all() for m in eigen)
    assert cost.forwards == 3 and cost.backwards == 2 and "3 images, 3 forwards + 2 backwards" in cost.text()


def test_map_is_cropped_to_the_image_in_the_padded_batch(frcnn):
    """320 x 330 is not resized (scale 1) and is padded to 320 x 352: our map must be the 10 x 11 grid spread over
    the padded batch and cropped to the image, where pytorch-grad-cam stretches the whole padded grid over the
    image. Oracle: their grid (up to an affine map, solved from their bilinear resize), brought to 320 x 352 by
    torch's interpolate and cropped."""
    model, _, _ = frcnn
    image = torch.rand((3, 320, 330), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        found = model([image])[0]
    box, label = found["boxes"][:1], found["labels"][:1]
    ours = box_score_cams(model, [image], [{"boxes": box, "labels": label}], "backbone.body.16")[0][0]
    with GradCAM(model, target_layers=[model.backbone.body["16"]]) as cam:
        theirs = cam(image[None], targets=[FasterRCNNBoxScoreTarget(labels=label, bounding_boxes=box.numpy())])[0]
    model.zero_grad(set_to_none=True)
    basis = np.eye(10 * 11, dtype=np.float32).reshape(-1, 10, 11)
    resize = np.stack([cv2.resize(b, (330, 320)).ravel() for b in basis], axis=1)  # (320 * 330, 110)
    grid = np.linalg.lstsq(resize, theirs.ravel().astype(np.float64), rcond=None)[0].reshape(10, 11)
    assert np.abs(resize @ grid.ravel() - theirs.ravel()).max() < 1e-4  # their map is that grid, resized
    spread = F.interpolate(torch.from_numpy(grid)[None, None], size=(320, 352), mode="bilinear",
                           align_corners=False)[0, 0, :, :330].numpy()
    assert ours.shape == (320, 330)
    assert correlation(ours, spread) >= 0.999
    assert correlation(ours, theirs) < 0.999  # the crop matters: the stretched map is a different one


def test_unmatched_detection_is_counted_and_empty(frcnn):
    model, image, found = frcnn
    absent = next(c for c in range(1, 91) if c not in found["labels"].tolist())
    boxes = torch.stack([found["boxes"][0], found["boxes"][0], torch.tensor([0.0, 0.0, 2.0, 2.0])])
    labels = torch.tensor([absent, int(found["labels"][0]), int(found["labels"][0])])
    cost = SecondPassCost()
    maps = box_score_cams(model, [image], [{"boxes": boxes, "labels": labels}], "backbone.body.16", cost=cost)[0]
    assert not maps[0].any() and maps[1].any()
    assert cost.unmatched == [(0, 0), (0, 2)] and cost.backwards == 1 and cost.explained == 3
    assert "2 of 3 detections not found again" in cost.text()


def test_box_target_prefers_the_same_label():
    """One box output twice (RetinaNet-style, two labels): pytorch-grad-cam's target takes the first best-IoU box,
    whose label differs, and gives 0; ours takes the box of the explained label."""
    box = torch.tensor([10.0, 10.0, 50.0, 40.0])
    output = {"boxes": torch.stack([box, box, box + 30]), "labels": torch.tensor([1, 2, 2]),
              "scores": torch.tensor([0.3, 0.6, 0.9])}
    assert float(box_target(output, box, 2)) == pytest.approx(1.6)
    assert float(box_target(output, box, 2, iou_term=False)) == pytest.approx(0.6)
    assert float(FasterRCNNBoxScoreTarget([2], [box.numpy()])(output)) == 0.0
    assert box_target(output, box, 3) is None
    assert box_target(output, box + torch.tensor([0.0, 0.0, 40.0, 40.0]), 1, iou_threshold=0.5) is None  # IoU .21


def test_renormalise_in_box_hand_set():
    cam = np.arange(16, dtype=np.float32).reshape(4, 4)
    inside = renormalise_in_box(cam, (1, 1, 3, 3), (4, 4))
    expected = np.zeros((4, 4), np.float32)
    expected[1:3, 1:3] = [[0.0, 0.2], [0.8, 1.0]]  # 5, 6, 9, 10 min-max normalised
    assert np.allclose(inside, expected)
    # upsampling is bilinear with half-pixel centres (F.interpolate, align_corners=False)
    small = np.array([[0.0, 1.0], [2.0, 5.0]], dtype=np.float32)
    whole = renormalise_in_box(small, (0, 0, 8, 6), (6, 8))
    up = F.interpolate(torch.from_numpy(small)[None, None], size=(6, 8), mode="bilinear", align_corners=False)[0, 0]
    up = (up - up.min()) / (up.max() - up.min())
    assert np.allclose(whole, up.numpy(), atol=1e-6)
    # out_size: the box is scaled with the map; a box under a pixel keeps that pixel; constant inside -> zero
    half = renormalise_in_box(cam, (0, 0, 2, 2), (4, 4), out_size=(8, 8))
    assert half.shape == (8, 8) and not half[4:].any() and not half[:, 4:].any() and half[:4, :4].max() == 1
    assert renormalise_in_box(cam, (2.1, 2.1, 2.2, 2.2), (4, 4)).sum() == 0  # one pixel: constant
    with pytest.raises(ValueError, match="xyxy"):
        renormalise_in_box(cam, (1, 2, 3), (4, 4))


def test_hooks_mode_and_flags_restored_after_an_error(frcnn):
    model, image, found = frcnn
    model.train()
    model.backbone.body["0"].requires_grad_(False)
    try:
        with pytest.raises(ValueError, match="image-level"):  # a per-box head is no map of the image
            box_score_cams(model, [image], [{"boxes": found["boxes"][:1], "labels": found["labels"][:1]}],
                           "roi_heads.box_head")
        assert count_hooks(model) == 0 and model.training
        assert not any(p.requires_grad for p in model.backbone.body["0"].parameters())
        assert all(p.requires_grad for p in model.roi_heads.parameters())
    finally:
        model.eval()
        model.backbone.body["0"].requires_grad_(True)
    with pytest.raises(ValueError, match="gradcam"):
        box_score_cams(model, [image], [{"boxes": found["boxes"][:1], "labels": found["labels"][:1]}],
                       "backbone.body.16", method="scorecam")
    with pytest.raises(ValueError, match="one per image"):
        box_score_cams(model, [image], [], "backbone.body.16")


@pytest.mark.parametrize("family", ["retinanet", "ssdlite"])
def test_other_families_default_layer_and_finite_maps(family):
    torch.manual_seed(0)
    if family == "retinanet":
        model = detection.retinanet_resnet50_fpn(weights=None, weights_backbone=None, score_thresh=0.0,
                                                 detections_per_img=5, min_size=128, max_size=160)
        expected = "backbone.body.layer4"
    else:
        model = detection.ssdlite320_mobilenet_v3_large(weights=None, weights_backbone=None, score_thresh=0.0,
                                                        detections_per_img=5)
        expected = "backbone.features.0"
    model.eval()
    layer, why = default_detection_layer(model)
    assert layer == expected, why
    image = torch.rand((3, 120, 140), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        found = model([image])[0]
    assert len(found["boxes"]) >= 2
    cost = SecondPassCost()
    maps = box_score_cams(model, [image], [{"boxes": found["boxes"][:2], "labels": found["labels"][:2]}], layer,
                          cost=cost)[0]
    eigen = eigen_cams(model, [image], layer, cost=cost)[0]
    assert [m.shape for m in maps] == [(120, 140)] * 2 and eigen.shape == (120, 140)
    assert all(np.isfinite(m).all() for m in maps + [eigen])
    assert not cost.unmatched and not cost.zero_gradient  # the scores reach the layer: gradients flow
    assert any(m.any() for m in maps) and eigen.any()
    assert count_hooks(model) == 0
