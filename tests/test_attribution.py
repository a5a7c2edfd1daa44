"""`attribution` through the real pipeline, on a small CNN trained to rely on a known image region: a white square in
the top-left corner makes the class "square", noise elsewhere. The faithful methods must put their attribution on
the square and beat the controls on deletion; on randomised copies Grad-CAM's maps must change and the Sobel
control's must not; the saved maps are the ones scored (a plain re-implementation of RISE's deletion on them gives
the same AUC) and Grad-CAM here equals the gradcam section's maps."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from reportgen.errors import ConfigError
from reportgen.runs.pipeline import run
from tests.helpers import compose_config
from tests.test_strategies import train_shortcut_net

SIDE, SQUARE, PER_CLASS = 24, 8, 16
CLASSES = ["plain", "square"]


def make_folder(root: Path, seed: int = 0):
    """plain/ and square/ folders of noisy grey images; square/ images have a white SQUARE x SQUARE corner."""
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for label, name in enumerate(CLASSES):
        (root / name).mkdir(parents=True)
        for i in range(PER_CLASS):
            pixels = np.clip(rng.normal(100, 45, (SIDE, SIDE, 3)), 0, 255)
            if name == "square":
                pixels[:SQUARE, :SQUARE] = 255
            Image.fromarray(pixels.astype(np.uint8)).save(root / name / f"{name}_{i:02d}.png")
            images.append(np.asarray(Image.open(root / name / f"{name}_{i:02d}.png"), dtype=np.float32) / 255)
            labels.append(label)
    return torch.as_tensor(np.stack(images)).permute(0, 3, 1, 2), torch.tensor(labels)


@pytest.fixture(scope="module")
def region(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("region")
    images, labels = make_folder(tmp / "data")
    model = train_shortcut_net(images, labels, tmp / "net.pt", CLASSES, steps=60)
    return {"root": tmp / "data", "weights": tmp / "net.pt", "model": model.eval(), "images": images,
            "labels": labels}


def overrides(region, *extra):
    return ["model=target", "model.target._target_=tests.test_strategies.shortcut_net",
            f"+model.target.path={region['weights']}", f"+model.target.class_names=[{','.join(CLASSES)}]",
            "model.preprocess.resize=24", "model.preprocess.crop=24",
            "model.preprocess.mean=[0,0,0]", "model.preprocess.std=[1,1,1]", f"dataset.root={region['root']}",
            "analysis=[predictions,gradcam,attribution]", "analysis.gradcam.layer=features",
            "analysis.attribution.layer=features", "analysis.attribution.images=null",
            "analysis.attribution.sanity_images=6", "runtime.num_workers=0", "runtime.progress=false",
            "runtime.batch_size=16", *extra]


@pytest.fixture(scope="module")
def whole_run(region, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "run"
    run(compose_config(overrides(region)), out_dir=out)
    results = out / "results"
    return {"out": out, "json": json.loads((results / "faithfulness.json").read_text()),
            "maps": np.load(results / "attributions.npz"), "gradcam": np.load(results / "gradcam.npz")}


def test_the_trained_net_relies_on_the_square(region):
    with torch.no_grad():
        predicted = region["model"](region["images"]).argmax(dim=1)
        covered = region["images"].clone()
        covered[:, :, :SQUARE, :SQUARE] = 100 / 255
        without = region["model"](covered).argmax(dim=1)
    assert (predicted == region["labels"]).all()
    assert (without == 0).all(), "covering the square makes every image plain"


def square_share(maps):
    """(N, H, W) -> (N,) share of each map's absolute mass inside the square."""
    maps = np.abs(maps.astype(np.float64))
    return maps[:, :SQUARE, :SQUARE].sum(axis=(1, 2)) / np.maximum(maps.sum(axis=(1, 2)), 1e-12)


def test_faithful_methods_put_their_attribution_on_the_square_and_beat_the_controls(whole_run):
    maps, report = whole_run["maps"], whole_run["json"]
    square = np.array([p.startswith("square/") for p in maps["paths"]])
    area = SQUARE * SQUARE / SIDE ** 2
    for method in ("saliency", "integrated_gradients", "gradcam"):
        assert square_share(maps[method][square]).mean() > 2 * area, method
    assert square_share(maps["random"][square]).mean() == pytest.approx(area, abs=0.05)
    controls = report["controls"]
    for method in ("integrated_gradients", "gradcam"):
        scores = report["methods"][method]
        assert scores["deletion_auc"] < min(controls["random"]["deletion_auc"], controls["sobel"]["deletion_auc"])
        assert scores["verdict"]["checks"]["deletion"] is True
        assert scores["verdict"]["line"]


def plain_deletion_auc(model, image, saliency, target, step):
    """RISE's deletion written out for one image: numpy ranking, one forward per step, trapezoid AUC."""
    order = np.argsort(-saliency.ravel(), kind="stable")
    current = image.clone()
    probabilities = []
    steps = -(-saliency.size // step)
    for i in range(steps + 1):
        with torch.no_grad():
            probabilities.append(torch.softmax(model(current[None]), dim=1)[0, target].item())
        if i < steps:
            rows, columns = np.unravel_index(order[i * step:(i + 1) * step], saliency.shape)
            current[:, rows, columns] = 0.0
    curve = np.array(probabilities)
    return (curve.sum() - curve[0] / 2 - curve[-1] / 2) / (len(curve) - 1)


def test_saved_maps_are_the_ones_scored_by_rise_deletion(region, whole_run):
    maps, report = whole_run["maps"], whole_run["json"]
    step = report["settings"]["step"]
    names = list(maps["paths"])
    per_image = report["methods"]["saliency"]["deletion_auc_per_image"]
    for row in (0, len(names) - 1):
        image = torch.as_tensor(np.asarray(Image.open(region["root"] / names[row]), dtype=np.float32) / 255)
        auc = plain_deletion_auc(region["model"], image.permute(2, 0, 1), maps["saliency"][row].astype(np.float32),
                                 int(maps["targets"][row]), step)
        assert per_image[row] == pytest.approx(auc, abs=1e-5)


def test_gradcam_here_equals_the_gradcam_section(whole_run):
    maps, cams = whole_run["maps"], whole_run["gradcam"]
    order = {p: i for i, p in enumerate(cams["paths"])}
    raw = torch.as_tensor(np.stack([cams["cams"][order[p]] for p in maps["paths"]]))[:, None]  # (N, 1, h, w)
    upsampled = torch.nn.functional.interpolate(raw, size=(SIDE, SIDE), mode="bilinear", align_corners=False)[:, 0]
    np.testing.assert_allclose(maps["gradcam"].astype(np.float32), upsampled.numpy(), rtol=2e-3, atol=1e-3)


def test_randomisation_changes_gradcam_and_not_the_sobel_control(whole_run):
    report = whole_run["json"]
    gradcam = report["methods"]["gradcam"]["randomization"]["top_down"]
    sobel = report["controls"]["sobel"]["randomization"]["top_down"]
    assert gradcam[-1]["spearman"] < 0.5 and gradcam[-1]["ssim"] < 0.9  # 1 and 1 for unchanged maps
    assert all(step["spearman"] == pytest.approx(1.0) for step in sobel)
    assert report["methods"]["gradcam"]["verdict"]["checks"]["sanity"] is True
    assert len(report["methods"]["gradcam"]["randomization"]["bottom_up"]) == len(gradcam)


def test_section_states_the_cost_before_the_work_and_the_page_has_the_verdicts(whole_run):
    page = (whole_run["out"] / "report" / "index.html").read_text()
    assert "Extra work for 32 images" in page and "forwards" in page
    for method in ("saliency", "integrated_gradients", "smoothgrad", "gradcam", "eigencam"):
        assert method in page
    costs = whole_run["json"]["methods"]["integrated_gradients"]["cost"]
    assert costs["backwards"] == 32 and costs["seconds"] > 0


def test_unknown_method_is_a_config_error_listing_the_methods(region, tmp_path):
    with pytest.raises(ConfigError) as caught:
        run(compose_config(overrides(region, "analysis.attribution.methods=[saliency,guided_backprop]")),
            out_dir=tmp_path / "run")
    assert "guided_backprop" in str(caught.value) and "integrated_gradients" in str(caught.value)
