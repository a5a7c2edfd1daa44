"""Segmentation models end to end: the numbers equal a plain loop with the library's own preprocessing and model,
shards merge to the single run, SegFormer and a segmentation_models_pytorch U-Net report, and the class Grad-CAM
agrees with pytorch-grad-cam's semantic segmentation target."""
import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from reportgen.runs.merge import main as merge_main
from reportgen.runs.pipeline import run
from tests.helpers import compose_config
from tests.seg_scenes import CLASSES, IMAGES, make_seg_folder, save_calibrated_lraspp, save_tiny_segformer, scene


@pytest.fixture(scope="module")
def seg_folder(tmp_path_factory):
    return make_seg_folder(tmp_path_factory.mktemp("seg"))


@pytest.fixture(scope="module")
def lraspp_checkpoint(tmp_path_factory):
    return save_calibrated_lraspp(tmp_path_factory.mktemp("ckpt") / "lraspp.pt")

FAST = ["runtime.num_workers=0", "runtime.progress=false", "report.gallery_size=4",
        "analysis=[summary,segmentation]", "analysis.segmentation.spread=3", "analysis.segmentation.worst=3"]
def plain_lraspp(checkpoint):
    from torchvision.models.segmentation import lraspp_mobilenet_v3_large

    model = lraspp_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=CLASSES)
    model.load_state_dict(torch.load(checkpoint, weights_only=True))
    return model.eval()


def plain_confusion(folder: Path, predict) -> tuple:
    """The folder's confusion matrix and per-image predicted classes, by plain code at each image's size."""
    conf = np.zeros((CLASSES, CLASSES), dtype=np.int64)
    predicted = {}
    for name, _, _ in sorted(IMAGES):
        with Image.open(folder / "images" / name) as opened:
            image = ImageOps.exif_transpose(opened).convert("RGB")
        with torch.no_grad():
            logits = predict(image)  # (1, K, h, w)
            up = F.interpolate(logits, size=(image.height, image.width), mode="bilinear", align_corners=False)
        pred = up.argmax(1)[0].numpy()
        predicted[name] = sorted(set(pred.ravel().tolist()))
        mask_file = (folder / "masks" / name).with_suffix(".png")
        if not mask_file.exists():
            continue
        truth = np.asarray(Image.open(mask_file)).astype(np.int64)
        if truth.shape != pred.shape:
            continue
        for t, p in zip(truth.ravel(), pred.ravel()):  # brute force, pixel by pixel
            if 0 <= t < CLASSES:
                conf[t, p] += 1
    return conf, predicted


def expected_metrics(conf):
    diag = np.diag(conf).astype(float)
    rows, cols = conf.sum(1), conf.sum(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = diag / (rows + cols - diag)
    present = (rows + cols) > 0
    return {"pixel_accuracy": diag.sum() / conf.sum(), "miou": float(np.mean(iou[present])),
            "fw_iou": float(sum(rows[c] / conf.sum() * iou[c] for c in range(len(rows)) if rows[c]))}


def seg_run(folder, checkpoint, out, extra=()):
    cfg = compose_config(["model=checkpoint", "model.arch=lraspp_mobilenet_v3_large", f"model.path={checkpoint}",
                          f"dataset.root={folder / 'images'}", f"dataset.masks={folder / 'masks'}",
                          "runtime.batch_size=3", *FAST, *extra])
    return run(cfg, out_dir=out)


def test_torchvision_segmentation_equals_a_plain_loop(seg_folder, lraspp_checkpoint, tmp_path):
    from torchvision.models.segmentation import LRASPP_MobileNet_V3_Large_Weights

    seg_run(seg_folder, lraspp_checkpoint, tmp_path / "run")
    results = tmp_path / "run" / "results"
    transform = LRASPP_MobileNet_V3_Large_Weights.DEFAULT.transforms()  # shorter side 520, no crop
    model = plain_lraspp(lraspp_checkpoint)
    conf, predicted = plain_confusion(seg_folder, lambda image: model(transform(image)[None])["out"])
    assert (conf.sum(1) > 0).sum() >= 3 and len({c for v in predicted.values() for c in v}) >= 2  # not trivial
    np.testing.assert_array_equal(np.load(results / "confusion_pixels.npy"), conf)
    data = json.loads((results / "segmentation.json").read_text())
    expected = expected_metrics(conf)
    for key, value in expected.items():
        assert data[key] == pytest.approx(value, abs=1e-12), key
    assert [c["pixels"] for c in data["per_class"]] == conf.sum(1).tolist()
    assert data["labelled_images"] == 5 and data["images"] == len(IMAGES)
    problems = {p["path"]: p["reason"] for p in data["problems"]}
    assert "56x80" in problems["f.jpg"] and "60x80" in problems["f.jpg"]  # wrong size: listed, never resized
    assert "9" in problems["g.jpg"]  # an out-of-range value: ignored, and said
    rows = {r["path"]: r for r in csv.DictReader((results / "segmentation_images.csv").open(encoding="utf-8"))}
    assert set(rows) == {name for name, _, _ in IMAGES}
    assert rows["nested/e.jpg"]["labelled"] == "0" and rows["nested/e.jpg"]["iou"] == ""
    for name, classes in predicted.items():
        assert rows[name]["classes_predicted"].split() == [str(c) for c in classes] or rows[name]["labelled"] == "1"
    html = (tmp_path / "run" / "report" / "index.html").read_text(encoding="utf-8")
    assert "Worst images" in html and "IoU over the classes present" in html and "Grad-CAM" in html
    manifest = json.loads((results / "manifest.json").read_text())
    assert manifest["model"]["task"] == "segmentation"


def test_segmentation_shards_merge_to_the_single_run(seg_folder, lraspp_checkpoint, tmp_path):
    seg_run(seg_folder, lraspp_checkpoint, tmp_path / "whole", ["model.preprocess.resize=96"])
    for shard in range(2):
        seg_run(seg_folder, lraspp_checkpoint, tmp_path / "sweep" / str(shard),
                [f"runtime.shard={shard}/2", "model.preprocess.resize=96"])
    assert merge_main([str(tmp_path / "sweep"), "--out", str(tmp_path / "merged")]) == 0
    whole, merged = tmp_path / "whole" / "results", tmp_path / "merged" / "results"
    np.testing.assert_array_equal(np.load(whole / "confusion_pixels.npy"), np.load(merged / "confusion_pixels.npy"))
    assert json.loads((whole / "segmentation.json").read_text()) == json.loads((merged / "segmentation.json").read_text())
    assert (whole / "segmentation_images.csv").read_text() == (merged / "segmentation_images.csv").read_text()


def test_segformer_report_equals_its_processor(tmp_path, seg_folder):
    transformers = pytest.importorskip("transformers")
    folder = tmp_path / "segformer"
    model = save_tiny_segformer(folder)
    cfg = compose_config(["model=hf", f"model.path={folder}", f"dataset.root={seg_folder / 'images'}",
                          f"dataset.masks={seg_folder / 'masks'}", "runtime.batch_size=4", *FAST])
    run(cfg, out_dir=tmp_path / "run")
    # the PIL backend resizes as reportgen does (transformers' default torchvision backend rounds differently: up to
    # 2 grey levels, see test_model_sources); post-processing: logits resized to the image, then argmax
    processor = transformers.AutoImageProcessor.from_pretrained(str(folder), backend="pil")

    def predict(image):
        inputs = processor(images=image, return_tensors="pt")
        return model(**inputs).logits

    conf, _ = plain_confusion(seg_folder, predict)
    # the processor's own post-processing gives the same maps as the plain loop's upsampling
    with Image.open(seg_folder / "images" / "a.jpg") as image:
        image = image.convert("RGB")
        outputs = model(**processor(images=image, return_tensors="pt"))
        post = processor.post_process_semantic_segmentation(outputs, target_sizes=[(image.height, image.width)])[0]
        up = F.interpolate(outputs.logits, size=(image.height, image.width), mode="bilinear", align_corners=False)
        assert torch.equal(post, up.argmax(1)[0])
    results = tmp_path / "run" / "results"
    np.testing.assert_array_equal(np.load(results / "confusion_pixels.npy"), conf)
    data = json.loads((results / "segmentation.json").read_text())
    assert data["class_names"] == ["bg", "red", "green", "blue"]
    manifest = json.loads((results / "manifest.json").read_text())
    assert manifest["model"]["task"] == "segmentation"
    assert manifest["model"]["preprocess"]["crop_mode"] == "squash"  # the processor's {height, width}: no crop


def test_smp_unet_report_without_masks(tmp_path, seg_folder):
    pytest.importorskip("segmentation_models_pytorch")
    cfg = compose_config(["model=target", "+model.target._target_=segmentation_models_pytorch.Unet",
                          "+model.target.encoder_name=resnet18", "+model.target.encoder_weights=null",
                          "+model.target.encoder_depth=3", "+model.target.decoder_channels=[32,16,8]",
                          f"+model.target.classes={CLASSES}", "model.preprocess.resize=64",
                          "model.preprocess.size_divisor=32", f"dataset.root={seg_folder / 'images'}", *FAST])
    run(cfg, out_dir=tmp_path / "run")
    results = tmp_path / "run" / "results"
    data = json.loads((results / "segmentation.json").read_text())
    manifest = json.loads((results / "manifest.json").read_text())
    assert manifest["model"]["task"] == "segmentation"
    assert manifest["model"]["preprocess"]["crop_mode"] == "whole"  # never a centre crop for segmentation
    assert data["miou"] is None and data["labelled_images"] == 0 and data["images"] == len(IMAGES)
    assert sum(c["predicted_pixels_all"] for c in data["per_class"]) == sum(h * w for _, (h, w), _ in IMAGES)
    assert data["cam_layer"] and data["cam_layer"].startswith("decoder")
    html = (tmp_path / "run" / "report" / "index.html").read_text(encoding="utf-8")
    assert "no masks" in html and "Predicted classes over every pixel" in html


def test_segmentation_gradcam_agrees_with_pytorch_grad_cam(lraspp_checkpoint):
    """The class Grad-CAM the gallery shows, through the pass's own leaf mechanism and default layer, against
    pytorch-grad-cam's SemanticSegmentationTarget on the same layer."""
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import SemanticSegmentationTarget

    from reportgen.analyses._segmentation_cam import class_cams, default_cam_layer
    from reportgen.engine.capture import CaptureEngine

    model = plain_lraspp(lraspp_checkpoint)
    image, _ = scene((96, 128), 3)
    x = ((torch.from_numpy(image).permute(2, 0, 1).float() / 255 - 0.45) / 0.225)[None]  # (1, 3, 96, 128)
    layer = default_cam_layer(model, x, CLASSES)
    assert layer == "classifier.cbr"  # LR-ASPP's high-resolution branch: the last feature map before the logits
    with CaptureEngine(model, gradients=[layer]) as engine:
        captures = engine.start_batch()
        with engine.forward_mode():
            logits = model(x)["out"]  # (1, K, 96, 128)
            predicted = logits.detach().argmax(1)[0]
            classes = sorted(set(predicted.unique().tolist()))[:2]
            ours = class_cams(logits, captures[layer], lambda t: t, "gradcam", [classes])[0]

    class Out(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, inputs):
            return self.inner(inputs)["out"]

    modules = dict(model.named_modules())
    for cls, cam in zip(classes, ours):
        mask = (predicted == cls).float().numpy()
        with GradCAM(model=Out(model), target_layers=[modules[layer]]) as oracle:
            theirs = oracle(input_tensor=x, targets=[SemanticSegmentationTarget(cls, mask)])[0]  # (96, 128)
        up = F.interpolate(cam[None, None], size=theirs.shape, mode="bilinear", align_corners=False)[0, 0].numpy()
        up = (up - up.min()) / max(up.max() - up.min(), 1e-12)
        assert np.corrcoef(up.ravel(), theirs.ravel())[0, 1] >= 0.999, cls


def test_masks_folder_that_does_not_exist_is_a_config_error(tmp_path, seg_folder):
    from reportgen.errors import ConfigError

    cfg = compose_config(["model=lraspp_mobilenet_v3_large", "model.weights=null",
                          f"dataset.root={seg_folder / 'images'}", f"dataset.masks={tmp_path / 'nope'}", *FAST])
    with pytest.raises(ConfigError, match="dataset.masks"):
        run(cfg, out_dir=tmp_path / "run")


SEG_REPORTS = {
    "deeplabv3": ["model=deeplabv3_mobilenet_v3_large", "model.weights=null", "model.preprocess.resize=96",
                  # the task-independent sections too, over images of several sizes
                  "analysis=[summary,activations,weights,graph,segmentation,predictions,gradcam]"],
    "segformer": ["model=hf"],  # model.path: the tiny SegFormer folder, added in the test
    "unet": ["model=target", "+model.target._target_=segmentation_models_pytorch.Unet",
             "+model.target.encoder_name=resnet18", "+model.target.encoder_weights=null",
             "+model.target.encoder_depth=3", "+model.target.decoder_channels=[32,16,8]",
             f"+model.target.classes={CLASSES}", "model.preprocess.resize=64", "model.preprocess.size_divisor=32"],
}


@pytest.mark.parametrize("kind", sorted(SEG_REPORTS))
def test_segmentation_reports_open_clean_with_overlays_in_the_legends_colours(kind, seg_folder, tmp_path):
    """DeepLabV3, SegFormer and a U-Net report open in Chromium without an error, a broken image or an axe
    violation, and every overlay pixel is its picture blended with the colour of a class the image's row lists."""
    import re

    from reportgen.report.segmentation_overlays import class_colours
    from tests.browser import CHROMIUM, open_page
    from tests.test_browser import assert_clean

    if not Path(CHROMIUM).exists():
        pytest.skip("Chromium is not installed (make system-deps / apt-get install chromium)")
    overrides = list(SEG_REPORTS[kind])
    if kind == "segformer":
        pytest.importorskip("transformers")
        save_tiny_segformer(tmp_path / "segformer")
        overrides.append(f"model.path={tmp_path / 'segformer'}")
    if kind == "unet":
        pytest.importorskip("segmentation_models_pytorch")
    fast = [o for o in FAST if not (o.startswith("analysis=") and any(x.startswith("analysis=") for x in overrides))]
    index = run(compose_config(overrides + [f"dataset.root={seg_folder / 'images'}",
                                            f"dataset.masks={seg_folder / 'masks'}", "report.image_format=png",
                                            *fast]), out_dir=tmp_path / "run")
    assert_clean(open_page(index))
    html = index.read_text(encoding="utf-8")
    if kind == "deeplabv3":
        assert "Some selected layers could not be analysed" not in html and "FLOP count is low" not in html
        assert "not applicable to segmentation models because" in html  # predictions and gradcam: a line each
    rows = {r["path"]: r for r in csv.DictReader((tmp_path / "run" / "results" /
                                                   "segmentation_images.csv").open(encoding="utf-8"))}
    classes = json.loads((tmp_path / "run" / "results" / "segmentation.json").read_text())["class_names"]
    colours = class_colours(len(classes)).astype(float)  # (K, 3)
    alpha = 0.55
    panels = re.findall(r'<img src="([^"]+)" alt="([^"]+): (image|mask|prediction)"', html)
    by_path = {}
    for src, path, title in panels:
        by_path.setdefault(path, {})[title] = np.asarray(Image.open(index.parent / src).convert("RGB"), dtype=float)
    checked = 0
    for path, shown in by_path.items():
        if "prediction" not in shown:
            continue
        recovered = (shown["prediction"] - (1 - alpha) * shown["image"]) / alpha  # (h, w, 3): the class colours
        distance = np.abs(recovered[:, :, None, :] - colours[None, None]).max(-1)  # (h, w, K)
        nearest = distance.argmin(-1)
        assert distance.min(-1).max() <= 3.0, path  # every pixel is a class colour (rounding aside)
        listed = {int(c) for c in rows[path]["classes_predicted"].split()}
        assert set(np.unique(nearest).tolist()) <= listed, path  # and the colour of a class it predicts
        checked += 1
    assert checked >= 3
