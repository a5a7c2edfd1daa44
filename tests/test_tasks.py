"""The task layer: which kind of vision model a run holds (model.task), decided from the model's library or a probe
forward, recorded in the manifest, and what each task's report gets. Oracles: the libraries' own forward passes and
transforms; tiny random models, nothing fetched (the hub download is made to fail)."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from torch import nn

from reportgen.errors import RunError
from reportgen.inputs.models import load_model
from reportgen.inputs.tasks import ModelOutputs, adapt_outputs, describe_output, task_from_output
from reportgen.runs.pipeline import run, seed_everything
from tests.helpers import compose_config, make_colour_folder

FAST = ["runtime.num_workers=0", "runtime.progress=false", "runtime.batch_size=4"]
TASK_FREE = ["summary", "graph", "weights", "activations"]  # the sections every task gets
# timm DINOv2 with 4 registers, 28 px (2x2 patches of 14), two blocks: a backbone as people use it (num_classes=0)
DINOV2 = ["model=timm", "model.name=vit_small_patch14_reg4_dinov2", "model.weights=null", "+model.kwargs.img_size=28",
          "+model.kwargs.num_classes=0", "+model.kwargs.depth=2", "+model.kwargs.embed_dim=48",
          "+model.kwargs.num_heads=2"]


@pytest.fixture(autouse=True)
def nothing_fetched(tmp_path, monkeypatch):
    """An empty torch hub and HF cache of the test's own, and any download attempt fails the test."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def refuse(url, *args, **kwargs):
        raise AssertionError(f"tried to download {url}")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse)
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)


def manifest(out: Path) -> dict:
    return json.loads((out / "results" / "manifest.json").read_text())


def section_ids(out: Path) -> set:
    html = (out / "report" / "index.html").read_text()
    return {part.split('"', 1)[0] for part in html.split('<section id="')[1:]}


def resnet18_backbone() -> nn.Module:
    """torchvision's resnet18 with its head removed, as people make a feature extractor."""
    model = torchvision.models.resnet18(weights=None)
    model.fc = nn.Identity()
    return model


class TokensNet(nn.Module):
    """Returns (B, 5, 7) tokens: an output that fits no task."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 7, 1)

    def forward(self, x):
        return self.conv(x).flatten(2)[:, :, :5].transpose(1, 2)  # (B, 5, 7)


def tokens_net() -> nn.Module:
    return TokensNet()


def test_outputs_are_typed_per_task():
    logits = torch.randn(2, 4)
    assert task_from_output(logits, 2)[0] == "classification"
    seg = {"out": torch.randn(2, 3, 8, 8), "aux": torch.randn(2, 3, 8, 8)}
    assert task_from_output(seg, 2)[0] == "segmentation"
    assert adapt_outputs("segmentation", seg, 2).mask_logits is seg["out"]
    boxes = [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0), "scores": torch.zeros(0)}] * 2
    assert task_from_output(boxes, 2)[0] == "detection"
    assert adapt_outputs("detection", boxes, 2).detections == boxes
    assert adapt_outputs("embedding", logits, 2).embedding is logits
    assert task_from_output(torch.randn(2, 5, 7), 2) is None
    assert describe_output(seg) == "dict {out: tensor (2, 3, 8, 8), aux: tensor (2, 3, 8, 8)}"
    with pytest.raises(RunError, match=r"model.task=segmentation expects .* returned tensor \(2, 4\)"):
        adapt_outputs("segmentation", logits, 2)
    assert isinstance(adapt_outputs("classification", logits, 2), ModelOutputs)


def test_dinov2_backbone_gets_no_predictions_and_its_embedding_is_the_models_output(tmp_path):
    folder = make_colour_folder(tmp_path / "images", per_class=2, noise=20, seed=0)
    cfg = compose_config(DINOV2 + FAST + [f"dataset.root={folder}",
                                          "analysis=[summary,predictions,gradcam,activations]"])
    out = tmp_path / "run"
    run(cfg, out_dir=out)
    model_facts = manifest(out)["model"]
    assert model_facts["task"] == "embedding"
    assert "num_classes=0" in model_facts["task_reason"]
    assert "class token" in model_facts["pooling"]
    results = out / "results"
    assert not (results / "predictions.csv").exists() and not (results / "gradcam.npz").exists()
    html = (out / "report" / "index.html").read_text()
    assert "not applicable to embedding models because" in html
    assert {"not-applicable", "summary", "activations"} <= section_ids(out)
    assert "predictions" not in section_ids(out) and "gradcam" not in section_ids(out)
    # the embedding map is the backbone's own output: a plain forward of the same weights on timm's own transform
    timm = pytest.importorskip("timm")
    seed_everything(int(cfg.runtime.seed))
    module = load_model(cfg.model).module.eval()
    data_config = timm.data.resolve_model_data_config(module, args={"img_size": 28})  # as timm's scripts pass it
    transform = timm.data.create_transform(**data_config)
    stored = np.load(results / "embeddings.npz")
    images = torch.stack([transform(Image.open(folder / p).convert("RGB")) for p in stored["paths"]])
    with torch.no_grad():
        expected = module(images).numpy()  # (N, 48)
    assert expected.shape == stored["features"].shape
    np.testing.assert_allclose(stored["features"], expected, rtol=1e-4, atol=1e-5)


def test_transformers_dinov2_folder_is_a_backbone_pooled_by_its_class_token(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                       intermediate_size=64, image_size=28, patch_size=14)
    model_dir = tmp_path / "dinov2"
    transformers.Dinov2Model(config).save_pretrained(model_dir)
    transformers.BitImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 28, "width": 28}
                                   ).save_pretrained(model_dir)
    # the PIL backend resizes as reportgen does (the default torchvision backend differs by a grey level's rounding)
    processor = transformers.AutoImageProcessor.from_pretrained(model_dir, backend="pil")
    folder = make_colour_folder(tmp_path / "images", per_class=2, noise=20, seed=1)
    out = tmp_path / "run"
    run(compose_config(["model=hf", f"model.path={model_dir}", f"dataset.root={folder}",
                        "analysis=[activations,attention]"] + FAST), out_dir=out)
    facts = manifest(out)["model"]
    assert facts["task"] == "embedding" and "Dinov2Model" in facts["task_reason"]
    stored = np.load(out / "results" / "embeddings.npz")
    reference = transformers.Dinov2Model.from_pretrained(model_dir).eval()
    pixels = processor([Image.open(folder / p).convert("RGB") for p in stored["paths"]],
                       return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        expected = reference(pixel_values=pixels).pooler_output.numpy()  # (N, 32)
    np.testing.assert_allclose(stored["features"], expected, rtol=1e-4, atol=1e-4)
    assert "attention" in section_ids(out)


def test_torchvision_model_with_identity_head_is_a_backbone(tmp_path):
    from torchvision import transforms

    from tests.test_knn import assert_same_rows, assert_same_totals, expected_files, read_csv

    folder = make_colour_folder(tmp_path / "images", per_class=2, noise=60, seed=2)
    out = tmp_path / "run"
    cfg = compose_config(["model=target", "model.target._target_=tests.test_tasks.resnet18_backbone",
                          "model.preprocess.resize=32", "model.preprocess.crop=32", f"dataset.root={folder}",
                          "analysis=[predictions,activations,knn]"] + FAST)
    run(cfg, out_dir=out)
    facts = manifest(out)["model"]
    assert facts["task"] == "embedding" and "fc" in facts["task_reason"]
    assert np.load(out / "results" / "embeddings.npz")["features"].shape == (6, 512)
    # the same weights (same seed) on torchvision's own transforms: k-NN by the plain protocol
    seed_everything(int(cfg.runtime.seed))
    model = resnet18_backbone().eval()
    transform = transforms.Compose([transforms.Resize(32), transforms.CenterCrop(32), transforms.ToTensor(),
                                    transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
    paths = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*.png"))
    with torch.no_grad():
        features = model(torch.stack([transform(Image.open(folder / p).convert("RGB")) for p in paths])).numpy()
    classes = ["blue", "green", "red"]
    labels = np.array([classes.index(p.split("/")[0]) for p in paths])
    want, table = expected_files(features, labels, classes, paths, 20, 0.07, 5)
    assert_same_totals(json.loads((out / "results" / "knn.json").read_text()), want)
    assert_same_rows(read_csv(out / "results" / "neighbours.csv")[1], table, tolerance=1e-4)


def test_segmentation_model_by_name_gets_the_task_independent_sections_offline(tmp_path):
    folder = make_colour_folder(tmp_path / "images", per_class=1, noise=20, seed=3)
    out = tmp_path / "run"
    run(compose_config(["model=lraspp_mobilenet_v3_large", "model.weights=null", "model.preprocess.resize=64",
                        "model.preprocess.crop=64", f"dataset.root={folder}",
                        "analysis=[summary,predictions,gradcam,activations,weights,graph,segmentation]"] + FAST),
        out_dir=out)
    facts = manifest(out)["model"]
    assert facts["task"] == "segmentation" and "torchvision.models.segmentation" in facts["task_reason"]
    assert facts["preprocess"]["crop_mode"] == "whole"  # the crop the config named is not applied: every pixel
    assert set(TASK_FREE) | {"segmentation"} <= section_ids(out)
    html = (out / "report" / "index.html").read_text()
    assert "not applicable to segmentation models because" in html
    assert not list((tmp_path / "torch_home").rglob("*.pth"))  # no backbone weights were fetched


def test_detection_model_by_name_gets_the_task_independent_sections(tmp_path):
    folder = make_colour_folder(tmp_path / "images", per_class=1, noise=20, seed=4)
    out = tmp_path / "run"
    run(compose_config(["model=fasterrcnn_mobilenet_v3_large_320_fpn", "model.weights=null",
                        "model.preprocess.resize=96", "model.preprocess.crop=96", f"dataset.root={folder}",
                        "analysis=[summary,predictions,activations,weights]"] + FAST), out_dir=out)
    facts = manifest(out)["model"]
    assert facts["task"] == "detection"
    assert {"summary", "activations", "weights"} <= section_ids(out)
    rows = list(csv.DictReader(open(out / "results" / "activation_stats.csv")))
    assert rows and all(r["layer"].startswith("backbone") for r in rows)  # image-level maps, never proposals


def test_an_output_that_fits_no_task_stops_before_the_pass(tmp_path):
    folder = make_colour_folder(tmp_path / "images", per_class=1, noise=20, seed=5)
    cfg = compose_config(["model=target", "model.target._target_=tests.test_tasks.tokens_net",
                          "model.preprocess.resize=16", "model.preprocess.crop=16", f"dataset.root={folder}",
                          "analysis=[summary]"] + FAST)
    with pytest.raises(RunError, match=r"fits no task: .*returned tensor \(2, 5, 7\).*model\.task"):
        run(cfg, out_dir=tmp_path / "run")
    assert not (tmp_path / "run" / "results" / "state.pt").exists()


def test_model_task_names_the_task_and_is_checked_against_the_output(tmp_path):
    folder = make_colour_folder(tmp_path / "images", per_class=1, noise=20, seed=6)
    tiny = ["model=target", "model.target._target_=tests.tiny_models.tiny_net", "model.preprocess.resize=16",
            "model.preprocess.crop=16", f"dataset.root={folder}"] + FAST
    with pytest.raises(RunError, match=r"model.task=segmentation expects .* returned tensor \(2, 3\)"):
        run(compose_config(tiny + ["model.task=segmentation", "analysis=[summary]"]), out_dir=tmp_path / "a")
    out = tmp_path / "b"
    run(compose_config(tiny + ["model.task=embedding", "analysis=[predictions,activations]"]), out_dir=out)
    facts = manifest(out)["model"]
    assert (facts["task"], facts["task_reason"]) == ("embedding", "set by model.task")
    assert not (out / "results" / "predictions.csv").exists()


def test_clip_image_tower_default_report_knn_equals_the_plain_protocol(tmp_path):
    """A CLIPVisionModelWithProjection folder with the default analyses: knn and embedding_maps run, predictions and
    Grad-CAM are one line each, and knn.json equals DINO's protocol over the tower's own image_embeds."""
    transformers = pytest.importorskip("transformers")
    from tests.test_knn import assert_same_rows, assert_same_totals, expected_files, read_csv

    torch.manual_seed(0)
    config = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                           num_attention_heads=2, image_size=32, patch_size=8, projection_dim=16)
    model_dir = tmp_path / "clip-vision"
    transformers.CLIPVisionModelWithProjection(config).save_pretrained(model_dir)
    transformers.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
                                    ).save_pretrained(model_dir)
    folder = make_colour_folder(tmp_path / "images", per_class=4, noise=60, seed=7)
    out = tmp_path / "run"
    run(compose_config(["model=hf", f"model.path={model_dir}", f"dataset.root={folder}"] + FAST), out_dir=out)
    facts = manifest(out)["model"]
    assert facts["task"] == "embedding" and "projected" in facts["pooling"]
    assert {"knn", "embedding_maps", "not-applicable"} <= section_ids(out)
    paths = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*.png"))
    reference = transformers.CLIPVisionModelWithProjection.from_pretrained(model_dir).eval()
    processor = transformers.AutoImageProcessor.from_pretrained(model_dir, backend="pil")
    with torch.no_grad():
        features = reference(**processor([Image.open(folder / p).convert("RGB") for p in paths],
                                         return_tensors="pt")).image_embeds.numpy()  # (N, 16)
    classes = ["blue", "green", "red"]
    labels = np.array([classes.index(p.split("/")[0]) for p in paths])
    want, table = expected_files(features, labels, classes, paths, 20, 0.07, 5)
    assert_same_totals(json.loads((out / "results" / "knn.json").read_text()), want)
    assert_same_rows(read_csv(out / "results" / "neighbours.csv")[1], table, tolerance=1e-4)


def test_comparing_a_backbone_run_says_why_not_image_by_image():
    from reportgen.report.compare_data import RunResults, join_predictions

    backbone = RunResults(run_dir=Path("a"), manifest={"model": {"task": "embedding"}}, predictions=None, totals={},
                          summary={}, name="dinov2")
    other = RunResults(run_dir=Path("b"), manifest={"model": {"task": "classification"}}, predictions=None,
                       totals={}, summary={}, name="resnet")
    with pytest.raises(RunError, match=r"not classifiers .* dinov2 \(embedding\); comparing backbones' k-NN"):
        join_predictions([backbone, other])


def test_segmentation_checkpoint_with_its_own_class_count_loads_offline(tmp_path):
    torch.manual_seed(0)
    model = torchvision.models.segmentation.lraspp_mobilenet_v3_large(weights=None, weights_backbone=None,
                                                                       num_classes=5)
    torch.save(model.state_dict(), tmp_path / "lraspp5.pt")
    from omegaconf import OmegaConf

    from reportgen.config.schema import ModelConfig

    node = {"source": "checkpoint", "arch": "lraspp_mobilenet_v3_large", "path": str(tmp_path / "lraspp5.pt")}
    cfg = OmegaConf.merge(OmegaConf.structured(ModelConfig), node)
    loaded = load_model(cfg)
    assert (loaded.task, loaded.class_names) == ("segmentation", [])  # 5 outputs: not VOC's 21 categories
    assert "num_classes=5 inferred" in " ".join(loaded.notes)
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(loaded.module.eval()(x)["out"], model.eval()(x)["out"])


def test_transformers_backbones_pool_as_the_model_means_it(tmp_path):
    """ViTModel: the layer-normed class token, never its pooler (DINO's checkpoints ship none: it would be random);
    ResNetModel: its pooled map flattened; a fine-tuned CLIPForImageClassification is a classifier, not zero-shot;
    ViT-MAE (random masking in every forward) is refused with the reason."""
    transformers = pytest.importorskip("transformers")
    from reportgen.errors import ModelLoadError
    from reportgen.inputs.hf_models import model_kind

    torch.manual_seed(0)
    vit = transformers.ViTModel(transformers.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                                       intermediate_size=64, image_size=28, patch_size=14),
                                add_pooling_layer=False)
    vit.save_pretrained(tmp_path / "dino-vit")
    resnet = transformers.ResNetModel(transformers.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1]))
    resnet.save_pretrained(tmp_path / "resnet")
    node = {"source": "hf", "weights": "DEFAULT"}
    from omegaconf import OmegaConf

    from reportgen.config.schema import ModelConfig

    x = torch.rand(2, 3, 28, 28)
    loaded = load_model(OmegaConf.merge(OmegaConf.structured(ModelConfig), dict(node, path=str(tmp_path / "dino-vit"))))
    assert loaded.task == "embedding" and "pooler" in loaded.pooling
    with torch.no_grad():
        assert torch.allclose(loaded.module.eval()(x), vit.eval()(pixel_values=x).last_hidden_state[:, 0], atol=1e-6)
    loaded = load_model(OmegaConf.merge(OmegaConf.structured(ModelConfig), dict(node, path=str(tmp_path / "resnet"))))
    with torch.no_grad():
        assert loaded.module.eval()(x).shape == (2, 16)
    config = transformers.CLIPConfig()
    config.architectures = ["CLIPForImageClassification"]
    assert model_kind(config) == "classifier"
    config.architectures = ["CLIPModel"]
    assert model_kind(config) == "zero_shot"
    mae = transformers.ViTMAEModel(transformers.ViTMAEConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                                             intermediate_size=64, image_size=28, patch_size=14))
    mae.save_pretrained(tmp_path / "mae")
    with pytest.raises(ModelLoadError, match="masks its patches at random"):
        load_model(OmegaConf.merge(OmegaConf.structured(ModelConfig), dict(node, path=str(tmp_path / "mae"))))


def test_zero_shot_head_scores_in_float32_under_bf16_autocast():
    from reportgen.inputs.clip_models import ZeroShotClassifier

    class Tower(ZeroShotClassifier):
        def image_features(self, images):
            return images.flatten(1)  # (B, D)

    torch.manual_seed(0)
    head = Tower(torch.nn.functional.normalize(torch.randn(12, 50), dim=0), torch.tensor(100.0))
    x = torch.randn(4, 3, 2, 2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = head(x)
    assert logits.dtype == torch.float32
    expected = 100.0 * torch.nn.functional.normalize(x.flatten(1), dim=1) @ head.classifier  # (4, 50) in fp32
    assert torch.allclose(logits, expected, atol=1e-4)  # bf16 scoring would be off by ~0.1


def test_a_forward_that_fails_on_the_probe_and_a_library_task_that_does_not_fit_are_clear(tmp_path):
    from types import SimpleNamespace

    from reportgen.inputs.tasks import decide_task

    class Broken(nn.Module):
        def forward(self, x):
            raise ValueError("needs 5 channels")

    with pytest.raises(RunError, match=r"forward failed on a probe of two blank images .*needs 5 channels"):
        decide_task("auto", SimpleNamespace(task=None, task_reason=""), Broken(), torch.zeros(2, 3, 8, 8))
    said = SimpleNamespace(task="embedding", task_reason="its library says so")
    message = r"library says its task is embedding \(its library says so\).*\(2, 16, 1, 1\)"
    with pytest.raises(RunError, match=message):
        decide_task("auto", said, lambda x: torch.zeros(2, 16, 1, 1), torch.zeros(2, 3, 8, 8))
