"""ImageNet-layout (WordNet-id) folders, 1-channel models and non-softmax heads, each against a plain loop:
PIL decode, torchvision transforms, the model, and the textbook formula (sorted synsets, grayscale, sigmoid)."""
from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Dict, List

import numpy as np
import pytest
import torch
import torchvision.transforms as T
from PIL import Image

from reportgen.errors import ConfigError
from reportgen.inputs.labels import folder_display_names, imagenet_synsets, match_labels
from reportgen.runs.pipeline import run
from tests.helpers import compose_config

FAST = ["runtime.num_workers=0", "runtime.progress=false", "analysis=[predictions]", "runtime.batch_size=4",
        "model=target", "model.preprocess.resize=16", "model.preprocess.crop=16"]
RGB_IDENTITY = ["model.preprocess.mean=[0,0,0]", "model.preprocess.std=[1,1,1]"]


class MeanColourHead(torch.nn.Module):
    """Logits = W @ (mean R, G, B) + b: hand-set so that a colour decides the class."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, in_channels: int = 3):
        super().__init__()
        self.stem = torch.nn.Conv2d(in_channels, in_channels, 1, bias=False)  # identity: the model's channel count
        with torch.no_grad():
            self.stem.weight.copy_(torch.eye(in_channels).view(in_channels, in_channels, 1, 1))
        self.head = torch.nn.Linear(in_channels, weight.shape[0])
        with torch.no_grad():
            self.head.weight.copy_(weight)
            self.head.bias.copy_(bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.stem(x).mean(dim=(2, 3)))  # (B, K)


def imagenet_head() -> torch.nn.Module:
    """1000 nameless outputs; red -> 0 (tench), green -> 1 (goldfish), blue -> 2 (great white shark)."""
    weight = torch.zeros(1000, 3)
    weight[0, 0] = weight[1, 1] = weight[2, 2] = 10.0
    return MeanColourHead(weight, torch.zeros(1000))


def gray_net() -> torch.nn.Module:
    """A 1-channel model with random weights (X-ray/MNIST style input)."""
    torch.manual_seed(3)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                                torch.nn.Flatten(), torch.nn.Linear(4, 3))
    model.class_names = ["dark", "mid", "bright"]
    return model


def one_logit() -> torch.nn.Module:
    """A binary classifier with one output: 'defect' when the image is red."""
    model = MeanColourHead(torch.tensor([[6.0, -3.0, -3.0]]), torch.tensor([-0.5]))
    model.class_names = ["defect"]
    return model


def three_sigmoids() -> torch.nn.Module:
    """Three independent outputs (multi-label): red, green, blue presence."""
    return MeanColourHead(torch.eye(3) * 8.0, torch.full((3,), -2.0))


def colour_folder(root: Path, classes: Dict[str, List[str]], seed: int = 0) -> Path:
    """`classes` maps folder name -> colours of its images (a wrong colour makes a mistake on purpose)."""
    rgb = {"red": (200, 40, 40), "green": (40, 190, 50), "blue": (30, 50, 210), "grey": (120, 120, 120)}
    rng = np.random.default_rng(seed)
    for folder, colours in classes.items():
        (root / folder).mkdir(parents=True)
        for i, colour in enumerate(colours):
            pixels = np.clip(np.array(rgb[colour]) + rng.normal(0, 30, (21, 27, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / folder / f"{i:02d}_{colour}.png")
    return root


def predictions(out: Path) -> Dict[str, Dict[str, str]]:
    with open(out / "results" / "predictions.csv", newline="") as handle:
        return {row["path"]: row for row in csv.DictReader(handle)}


def plain_inputs(path: Path, mode: str, mean, std) -> torch.Tensor:
    transform = T.Compose([T.Resize(16), T.CenterCrop(16), T.ToTensor(), T.Normalize(mean, std)])
    return transform(Image.open(path).convert(mode))[None]  # (1, C, 16, 16)


def test_imagenet_layout_folder_accuracy_equals_sorted_synset_loop(tmp_path):
    layout = {"n01440764": ["red", "red", "green"], "n01443537": ["green", "green"],
              "n01484850": ["blue", "red", "blue"], "n99999999": ["red"]}  # the last is no ImageNet-1k class
    root = colour_folder(tmp_path / "val", layout)
    out = tmp_path / "run"
    run(compose_config(FAST + RGB_IDENTITY + [f"model.target._target_={__name__}.imagenet_head",
                                              f"dataset.root={root}", "analysis=[predictions,gradcam]",
                                              "analysis.gradcam.target=label"]), out_dir=out)
    model, synsets = imagenet_head().eval(), sorted(imagenet_synsets())
    cams = np.load(out / "results" / "gradcam.npz")
    for path, target in zip(cams["paths"], cams["classes"]):  # Grad-CAM explains the folder's class by id
        folder = Path(str(path)).parent.name
        expected = synsets.index(folder) if folder in synsets else None
        if expected is not None:
            assert int(target) == expected, path
    correct = evaluated = 0
    per_class: Dict[str, List[int]] = {}
    with torch.no_grad():
        for path in sorted(root.rglob("*.png")):
            folder = path.parent.name
            if folder not in synsets:
                continue
            predicted = int(model(plain_inputs(path, "RGB", [0, 0, 0], [1, 1, 1])).argmax())
            hit = int(predicted == synsets.index(folder))
            correct, evaluated = correct + hit, evaluated + 1
            per_class.setdefault(folder, []).append(hit)
    totals = json.loads((out / "results" / "predictions.json").read_text())
    assert evaluated == 8 and 0 < correct < evaluated  # two planted mistakes
    assert totals["evaluated"] == evaluated and totals["top1_accuracy"] == pytest.approx(correct / evaluated)
    assert totals["per_class_accuracy"] == {k: pytest.approx(np.mean(v), abs=1e-4) for k, v in per_class.items()}
    page = (out / "report" / "index.html").read_text()
    assert "tench (n01440764)" in page and "great white shark (n01484850)" in page


def test_wordnet_ids_map_by_id_for_declared_and_subset_synsets():
    synsets = imagenet_synsets()
    assert len(synsets) == 1000 and synsets == sorted(synsets) and synsets[0] == "n01440764"
    # a 1000-class head: any subset of folders (ImageNet-A/-R's 200) maps to the sorted-synset index
    subset = ["n01443537", "n01484850", "n04599235"]
    assert match_labels(subset, [], synsets).tolist() == [synsets.index(s) for s in subset]
    # a model that declares its own synsets (a 3-class subset head, in its own order)
    declared = ["n04599235", "n01440764", "n01443537"]
    assert match_labels(["n01440764", "n01443537", "n02000000", "cat"], ["wool", "tench", "goldfish"],
                        declared).tolist() == [1, 2, -1, -1]
    assert folder_display_names(["n01440764", "cat"], [], ()) == ["tench (n01440764)", "cat"]


def test_one_channel_model_predictions_equal_a_grayscale_loop(tmp_path):
    root = colour_folder(tmp_path / "data", {"dark": ["blue", "green"], "mid": ["grey", "red"],
                                             "bright": ["green", "grey"]})
    base = FAST + [f"model.target._target_={__name__}.gray_net", f"dataset.root={root}"]
    with pytest.raises(ConfigError, match=r"model\.preprocess\.mean.*1 value.*1 channel"):
        run(compose_config(base), out_dir=tmp_path / "refused")  # ImageNet's 3 means for a 1-channel model
    out = tmp_path / "run"
    run(compose_config(base + ["model.preprocess.mean=[0.5]", "model.preprocess.std=[0.25]"]), out_dir=out)
    rows = predictions(out)
    model = gray_net().eval()
    assert len(rows) == 6
    with torch.no_grad():
        for path in sorted(root.rglob("*.png")):
            probs = torch.softmax(model(plain_inputs(path, "L", [0.5], [0.25])), dim=1)[0]  # (3,)
            row = rows[path.relative_to(root).as_posix()]
            assert int(row["top1_index"]) == int(probs.argmax())
            assert float(row["top1_prob"]) == pytest.approx(float(probs.max()), abs=1e-5)
    manifest = json.loads((out / "results" / "manifest.json").read_text())
    assert manifest["model"]["preprocess"]["channels"] == 1 and manifest["model"]["preprocess"]["mean"] == [0.5]
    assert "grayscale" in (out / "report" / "index.html").read_text()


def test_one_logit_probabilities_are_sigmoids(tmp_path):
    root = colour_folder(tmp_path / "data", {"defect": ["red", "red", "blue"], "not defect": ["green", "grey"]})
    out = tmp_path / "run"
    run(compose_config(FAST + RGB_IDENTITY + [f"model.target._target_={__name__}.one_logit",
                                              f"dataset.root={root}"]), out_dir=out)
    rows = predictions(out)
    model = one_logit().eval()
    correct = 0
    with torch.no_grad():
        for path in sorted(root.rglob("*.png")):
            p = float(torch.sigmoid(model(plain_inputs(path, "RGB", [0, 0, 0], [1, 1, 1])))[0, 0])
            row = rows[path.relative_to(root).as_posix()]
            assert row["top1_name"] == ("defect" if p >= 0.5 else "not defect")
            assert float(row["top1_prob"]) == pytest.approx(max(p, 1 - p), abs=1e-5)
            assert sorted(float(q) for q in row["topk_probs"].split()) == pytest.approx(sorted([p, 1 - p]), abs=1e-5)
            correct += (p >= 0.5) == (path.parent.name == "defect")
    totals = json.loads((out / "results" / "predictions.json").read_text())
    assert totals["activation"] == "binary" and totals["evaluated"] == 5
    assert totals["top1_accuracy"] == pytest.approx(correct / 5)


def test_multi_label_head_gets_per_class_metrics_not_top1(tmp_path):
    root = colour_folder(tmp_path / "data", {"red": ["red", "red", "grey"], "green": ["green", "blue"],
                                             "blue": ["blue", "blue"]})
    out = tmp_path / "run"
    run(compose_config(FAST + RGB_IDENTITY + [f"model.target._target_={__name__}.three_sigmoids",
                                              "model.labels_file=" + str(_labels(tmp_path)),
                                              "analysis.predictions.activation=sigmoid", f"dataset.root={root}"]),
        out_dir=out)
    totals = json.loads((out / "results" / "predictions.json").read_text())
    assert totals["activation"] == "multi-label" and totals["top1_accuracy"] is None
    model, names = three_sigmoids().eval(), ["red", "green", "blue"]
    flagged = {}
    with torch.no_grad():
        for path in sorted(root.rglob("*.png")):
            flagged[path] = torch.sigmoid(model(plain_inputs(path, "RGB", [0, 0, 0], [1, 1, 1])))[0] >= 0.5  # (3,)
    for c, name in enumerate(names):
        own = [f[c].item() for p, f in flagged.items() if p.parent.name == name]
        positives = [p.parent.name == name for p, f in flagged.items() if f[c]]
        metrics = totals["per_class_multi_label"][name]
        assert metrics["recall"] == pytest.approx(np.mean(own), abs=1e-4)
        assert metrics["precision"] == pytest.approx(np.mean(positives), abs=1e-4)
    assert "no top-1 accuracy" in (out / "report" / "index.html").read_text()


def _labels(tmp_path: Path) -> Path:
    path = tmp_path / "labels.txt"
    path.write_text("red\ngreen\nblue\n")
    return path


def test_activation_choice_is_checked():
    from reportgen.config.validate import validate

    with pytest.raises(ConfigError, match="activation"):
        validate(compose_config(["analysis.predictions.activation=softmaxx"]))
