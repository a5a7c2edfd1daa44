"""model=timm and model=hf: loading (pretrained from a seeded hub cache, random, state dicts), preprocessing against
the libraries' own transforms on real decoded images, class names, and top-1 against the libraries' own
processor + model. Tiny random configs only; nothing touches the network (HF_HUB_OFFLINE=1, temporary HF_HOME)."""
from __future__ import annotations

import csv
import json
import sys
from pathlib import Path
from typing import Dict, List

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from reportgen.config.schema import ModelConfig
from reportgen.config.validate import validate
from reportgen.errors import ConfigError, ModelLoadError
from reportgen.inputs.data import decode_image
from reportgen.inputs.hf_models import HFClassifier, processor_to_preprocess
from reportgen.inputs.labels import imagenet_synsets
from reportgen.inputs.models import load_model
from reportgen.runs.pipeline import run
from tests.helpers import compose_config

timm = pytest.importorskip("timm", reason="model=timm needs timm (pip install -e '.[dev]')")
transformers = pytest.importorskip("transformers", reason="model=hf needs transformers (pip install -e '.[dev]')")
from safetensors.torch import save_file  # noqa: E402  (after the skips: an optional extra)

FAST = ["runtime.num_workers=0", "runtime.progress=false", "analysis=[predictions]", "runtime.batch_size=4"]
# ViT/DeiT at 32 px (2x2 patches of 16), two blocks: the data config is told the size, as a user would
TINY_VIT = {"img_size": 32, "depth": 2, "pretrained_cfg_overlay": {"input_size": [3, 32, 32]}}


@pytest.fixture(autouse=True)
def offline_hub(tmp_path, monkeypatch):
    """An empty hub cache of our own, and no network: every test sees only what it seeds."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return tmp_path / "hf_home" / "hub"


def photos(folder: Path, classes: List[str], per_class: int = 3, seed: int = 0) -> Path:
    """Photo-like JPEG/PNG files of odd sizes (smooth gradients plus noise) in class folders."""
    rng = np.random.default_rng(seed)
    sizes = [(50, 37), (37, 61), (64, 64), (90, 70), (41, 48)]
    for c, name in enumerate(classes):
        (folder / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            w, h = sizes[(c + i) % len(sizes)]
            yy, xx = np.mgrid[0:h, 0:w]
            base = np.stack([xx * 255 / w, yy * 255 / h, np.full((h, w), 40.0 * (c + 1))], axis=-1)
            pixels = np.clip(base + rng.normal(0, 25, (h, w, 3)), 0, 255).astype(np.uint8)
            suffix = ".jpg" if i % 2 == 0 else ".png"
            Image.fromarray(pixels).save(folder / name / f"img_{i}{suffix}")
    return folder


def model_cfg(**node):
    return OmegaConf.merge(OmegaConf.structured(ModelConfig), node)


def seed_hub_repo(hub: Path, repo_id: str, files: Dict[str, bytes], revision: str = "0123abcd" * 5) -> Path:
    """huggingface_hub's cache layout: models--org--name/{refs/main, blobs/, snapshots/<rev>/<file> -> blob}."""
    repo = hub / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(revision)
    snapshot = repo / "snapshots" / revision
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir()
    for name, data in files.items():
        blob = repo / "blobs" / f"blob{len(list((repo / 'blobs').iterdir()))}"
        blob.write_bytes(data)
        (snapshot / name).symlink_to(Path("..") / ".." / "blobs" / blob.name)
    return snapshot


def safetensors_bytes(state: Dict[str, torch.Tensor], tmp: Path) -> bytes:
    path = tmp / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path.read_bytes()


def read_predictions(out: Path) -> List[Dict[str, str]]:
    with open(out / "results" / "predictions.csv", newline="") as handle:
        return list(csv.DictReader(handle))


# ---------------------------------------------------------------------------------------------------------------
# timm


TIMM_CASES = [
    ("vit_tiny_patch16_224", TINY_VIT),  # bicubic, crop_pct 0.9, mean/std 0.5
    ("deit_tiny_distilled_patch16_224", TINY_VIT),  # ImageNet mean/std, two prefix tokens
    ("convnext_atto", {"pretrained_cfg_overlay": {"input_size": [3, 48, 48]}}),  # crop_pct 0.95
    ("resnet10t", {"pretrained_cfg_overlay": {"input_size": [3, 40, 40], "crop_mode": "squash"}}),
    ("resnet10t", {"pretrained_cfg_overlay": {"input_size": [3, 40, 40], "crop_mode": "border", "crop_pct": 0.8}}),
    ("resnet10t", {"pretrained_cfg_overlay": {"input_size": [3, 36, 36], "interpolation": "bilinear",
                                              "crop_pct": 1.0}}),
]


@pytest.mark.parametrize("name,kwargs", TIMM_CASES)
def test_timm_preprocessing_equals_create_transform(tmp_path, name, kwargs):
    loaded = load_model(model_cfg(source="timm", name=name, weights=None, kwargs=kwargs))
    config = timm.data.resolve_model_data_config(loaded.module)
    reference = timm.data.create_transform(**config)  # timm's own evaluation transform
    pre = loaded.preprocess
    assert (pre.crop, pre.interpolation, pre.crop_mode) == (config["input_size"][1], config["interpolation"],
                                                            config["crop_mode"])
    assert pre.resize == int(np.floor(config["input_size"][1] / config["crop_pct"]))
    assert pre.mean == tuple(config["mean"]) and pre.std == tuple(config["std"])
    folder = photos(tmp_path / "imgs", ["a"], per_class=5)
    for path in sorted(folder.rglob("*.*")):
        image = decode_image(path)
        ours = pre.normalize(pre.to_uint8(image)[None])[0]  # (3, crop, crop)
        theirs = reference(image)
        # Both resize the same PIL image with the same PIL filter (uint8 result) and crop/pad alike; then x/255 and
        # (x - mean) / std in float32. Only the float arithmetic's order may differ: 1e-6 is a few ulps at |x| ~ 2.
        assert ours.shape == theirs.shape
        assert torch.allclose(ours, theirs, atol=1e-6, rtol=0), (path.name, (ours - theirs).abs().max().item())


def test_timm_state_dict_run_matches_timm_loop(tmp_path):
    """A fine-tuned-style checkpoint (3-class head, safetensors): num_classes inferred from the file; the report's
    top-1 equals timm's create_transform + the same model."""
    torch.manual_seed(0)
    reference = timm.create_model("deit_tiny_distilled_patch16_224", num_classes=3, **TINY_VIT).eval()
    weights = tmp_path / "finetuned.safetensors"
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, str(weights))
    folder = photos(tmp_path / "data", ["cat", "dog", "eel"])
    overrides = ["model=timm", "model.name=deit_tiny_distilled_patch16_224", f"model.path={weights}",
                 "+model.kwargs.img_size=32", "+model.kwargs.depth=2",
                 "+model.kwargs.pretrained_cfg_overlay.input_size=[3,32,32]",
                 f"dataset.root={folder}"] + FAST
    out = tmp_path / "run"
    run(compose_config(overrides), out_dir=out)
    transform = timm.data.create_transform(**timm.data.resolve_model_data_config(reference))
    rows = read_predictions(out)
    assert len(rows) == 9
    with torch.no_grad():
        for row in rows:
            logits = reference(transform(Image.open(folder / row["path"]).convert("RGB"))[None])  # (1, 3)
            probs = torch.softmax(logits, dim=1)[0]
            assert int(row["top1_index"]) == int(probs.argmax())
            assert abs(float(row["top1_prob"]) - float(probs.max())) < 1e-4
    manifest = json.loads((out / "results" / "manifest.json").read_text())
    model = manifest["model"]
    assert model["library"] == "timm" and model["name"] == "deit_tiny_distilled_patch16_224"
    assert model["weights_file"] == str(weights) and model["random_init"] is False
    assert model["preprocess"] == {"resize": 35, "crop": 32, "crop_mode": "center", "interpolation": "bicubic",
                                   "mean": list(timm.data.IMAGENET_DEFAULT_MEAN),
                                   "std": list(timm.data.IMAGENET_DEFAULT_STD), "channels": 3, "crop_offset": "round",
                                   "size_divisor": 1, "max_size": 0}
    page = (out / "report" / "index.html").read_text()
    assert "num_classes=3 inferred from the checkpoint" in page
    assert "shorter side 35, centre crop 32, bicubic, RGB" in page


def test_timm_pth_checkpoint_infers_head_and_input_channels(tmp_path):
    torch.manual_seed(2)
    reference = timm.create_model("resnet10t", in_chans=1, num_classes=2).eval()
    path = tmp_path / "gray.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in reference.state_dict().items()}}, path)  # DDP-style
    loaded = load_model(model_cfg(source="timm", name="resnet10t", path=str(path),
                                  preprocess={"mean": [0.5], "std": [0.25]}))
    assert {"num_classes=2 inferred from the checkpoint's fc.weight",
            "in_chans=1 inferred from the checkpoint's conv1.0.weight"} <= set(loaded.notes)
    assert loaded.preprocess.channels == 1 and loaded.weights == "checkpoint gray.pth"
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded.module(x), reference(x))
    with pytest.raises(ModelLoadError, match="does not match architecture 'convnext_atto'"):
        load_model(model_cfg(source="timm", name="convnext_atto", path=str(path)))


def test_timm_pretrained_from_seeded_hub_cache(tmp_path, offline_hub):
    torch.manual_seed(1)
    source = timm.create_model("vit_tiny_patch16_224", **TINY_VIT)
    hub_id = timm.models.get_pretrained_cfg("vit_tiny_patch16_224").hf_hub_id
    seed_hub_repo(offline_hub, hub_id, {"model.safetensors": safetensors_bytes(source.state_dict(), tmp_path)})
    loaded = load_model(model_cfg(source="timm", name="vit_tiny_patch16_224", kwargs=TINY_VIT))
    assert loaded.random_init is False and loaded.library == "timm"
    assert loaded.weights_file.endswith("model.safetensors") and hub_id.replace("/", "--") in loaded.weights_file
    for key, value in source.state_dict().items():
        assert torch.equal(loaded.module.state_dict()[key], value), key
    assert loaded.class_names[:2] == ["tench", "goldfish"] and len(loaded.class_names) == 1000
    assert loaded.synsets[0] == "n01440764" and loaded.synsets == sorted(loaded.synsets)


def test_timm_label_names_from_the_cached_hub_config(tmp_path, offline_hub):
    """A hub repo's config.json may carry label names (WordNet ids here, in an order of its own)."""
    source = timm.create_model("test_convnext")
    labels = list(reversed(imagenet_synsets()))
    hub_id = timm.models.get_pretrained_cfg("test_convnext").hf_hub_id
    config = json.dumps({"architecture": "test_convnext", "num_classes": 1000, "label_names": labels}).encode()
    seed_hub_repo(offline_hub, hub_id, {"model.safetensors": safetensors_bytes(source.state_dict(), tmp_path),
                                        "config.json": config})
    loaded = load_model(model_cfg(source="timm", name="test_convnext"))
    info = timm.data.ImageNetInfo("imagenet-1k")
    assert loaded.synsets == labels
    assert loaded.class_names[:2] == [info.label_name_to_description(x).split(",")[0] for x in labels[:2]]
    assert loaded.preprocess.crop == 160  # test_convnext's own data config


def test_timm_pretrained_missing_offline_is_one_clear_error(offline_hub):
    with pytest.raises(ModelLoadError) as info:
        load_model(model_cfg(source="timm", name="vit_tiny_patch16_224", kwargs=TINY_VIT))
    message = str(info.value)
    hub_id = timm.models.get_pretrained_cfg("vit_tiny_patch16_224").hf_hub_id
    assert hub_id in message and "model.safetensors" in message
    assert str(offline_hub / ("models--" + hub_id.replace("/", "--"))) in message
    assert "model.weights=null" in message and "HF_HUB_OFFLINE" in message


def test_timm_random_init_is_bannered_and_input_channels_come_from_the_model(tmp_path):
    loaded = load_model(model_cfg(source="timm", name="resnet10t", weights=None,
                                  kwargs={"in_chans": 1, "num_classes": 2},
                                  preprocess={"mean": [0.5], "std": [0.25]}))
    assert loaded.random_init and loaded.weights == "random initialisation"
    assert loaded.preprocess.channels == 1 and loaded.class_names == []
    with pytest.raises(ConfigError, match="model.preprocess.mean.*1 value"):
        load_model(model_cfg(source="timm", name="resnet10t", weights=None, kwargs={"in_chans": 1}))


def test_timm_config_errors():
    with pytest.raises(ConfigError, match="vit_small_patch16_224"):
        validate(compose_config(["model=timm", "model.name=vit_smal_patch16_224"]))
    with pytest.raises(ConfigError, match="model.weights"):
        validate(compose_config(["model=timm", "model.name=resnet10t", "model.weights=IMAGENET1K_V1"]))
    with pytest.raises(ConfigError, match="model.path"):
        validate(compose_config(["model=timm", "model.name=resnet10t", "model.path=/nonexistent.safetensors"]))


def test_missing_extra_names_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # import timm now raises ImportError
    with pytest.raises(ModelLoadError, match=r"reportgen\[timm\]"):
        load_model(model_cfg(source="timm", name="resnet10t", weights=None))


# ---------------------------------------------------------------------------------------------------------------
# Hugging Face transformers


def save_hf_vit(folder: Path, num_labels: int = 3, size: int = 32, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    labels = {0: "cat", 1: "dog", 2: "eel"} if num_labels == 3 else None
    config = transformers.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                    image_size=size, patch_size=8, num_labels=num_labels,
                                    **({"id2label": labels, "label2id": {v: k for k, v in labels.items()}}
                                       if labels else {}))
    transformers.ViTForImageClassification(config).save_pretrained(folder)
    transformers.ViTImageProcessor(size={"height": size, "width": size}).save_pretrained(folder)
    return folder


def save_hf_convnext(folder: Path, edge: int = 32, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    config = transformers.ConvNextConfig(num_stages=2, hidden_sizes=[8, 16], depths=[1, 1], num_labels=3,
                                         id2label={0: "cat", 1: "dog", 2: "eel"},
                                         label2id={"cat": 0, "dog": 1, "eel": 2})
    transformers.ConvNextForImageClassification(config).save_pretrained(folder)
    transformers.ConvNextImageProcessor(size={"shortest_edge": edge}, crop_pct=0.875).save_pretrained(folder)
    return folder


def processor_tensor(folder: Path, image: Image.Image, backend: str = None) -> torch.Tensor:
    kwargs = {"backend": backend} if backend else {}
    processor = transformers.AutoImageProcessor.from_pretrained(str(folder), **kwargs)
    return processor(images=image, return_tensors="pt")["pixel_values"][0]  # (3, H, W)


@pytest.mark.parametrize("kind,expected", [
    ("vit", {"resize": 32, "crop": 32, "crop_mode": "squash", "interpolation": "bilinear"}),  # stretch, no crop
    ("convnext", {"resize": 36, "crop": 32, "crop_mode": "center", "interpolation": "bicubic"}),  # int(32 / 0.875)
    ("convnext384", {"resize": 384, "crop": 384, "crop_mode": "squash", "interpolation": "bicubic"}),  # warp
])
def test_hf_preprocessing_equals_image_processor(tmp_path, kind, expected):
    folder = tmp_path / kind
    if kind == "vit":
        save_hf_vit(folder)
    else:
        save_hf_convnext(folder, edge=384 if kind == "convnext384" else 32)
    pre = load_model(model_cfg(source="hf", path=str(folder))).preprocess
    assert {k: getattr(pre, k) for k in expected} == expected
    images = photos(tmp_path / "imgs", ["a"], per_class=5)
    for path in sorted(images.rglob("*.*")):
        image = decode_image(path)
        ours = pre.normalize(pre.to_uint8(image)[None])[0]  # (3, crop, crop)
        default = processor_tensor(folder, image)  # transformers' default: the torchvision backend
        assert ours.shape == default.shape
        # The torchvision backend resizes a uint8 tensor with its own antialiasing kernels; we resize in PIL, as the
        # PIL backend does: the pixels may differ by rounding. Measured on these images: at most 2 grey levels, mean
        # under 0.002 in normalised units. Allowed: 2 grey levels per pixel, mean 0.005.
        diff = (ours - default).abs()
        two_levels = 2 / 255 / min(pre.std) + 1e-5
        assert diff.mean() < 0.005 and diff.max() <= two_levels, (path.name, diff.mean().item(), diff.max().item())
        # The PIL backend does what we do, in the same order (its centre crop's offset is floor((h - c) / 2), as
        # ours for transformers): equal up to float rounding.
        pil = processor_tensor(folder, image, backend="pil")
        assert torch.allclose(ours, pil, atol=1e-5, rtol=0), (path.name, (ours - pil).abs().max().item())


def test_hf_shortest_edge_processor_and_unsupported_geometries(tmp_path):
    """A CLIP-style processor (shorter side, then centre crop, bicubic) matches too; what cannot be batched or is
    not square is refused with the reason."""
    clip_cls = transformers.CLIPImageProcessor
    processor = clip_cls(size={"shortest_edge": 30}, crop_size={"height": 28, "width": 28})
    pre = processor_to_preprocess(processor, 3)
    assert (pre.resize, pre.crop, pre.crop_mode, pre.interpolation) == (30, 28, "center", "bicubic")
    for path in sorted(photos(tmp_path / "imgs", ["a"], per_class=5).rglob("*.*")):
        image = decode_image(path)
        ours = pre.normalize(pre.to_uint8(image)[None])[0]  # (3, 28, 28)
        theirs = processor(images=image, return_tensors="pt")["pixel_values"][0]
        assert (ours - theirs).abs().max() <= 2 / 255 / min(pre.std) + 1e-5, path.name  # as for ViT/ConvNeXt
    with pytest.raises(ValueError, match="different shapes"):
        processor_to_preprocess(clip_cls(size={"shortest_edge": 30}, do_center_crop=False), 3)
    with pytest.raises(ValueError, match="not square"):
        processor_to_preprocess(transformers.ViTImageProcessor(size={"height": 32, "width": 48}), 3)


@pytest.mark.parametrize("kind", ["vit", "convnext"])
def test_hf_folder_run_matches_processor_and_model(tmp_path, kind):
    folder = save_hf_vit(tmp_path / "model") if kind == "vit" else save_hf_convnext(tmp_path / "model")
    data = photos(tmp_path / "data", ["cat", "dog", "eel"])
    out = tmp_path / "run"
    run(compose_config(["model=hf", f"model.path={folder}", f"dataset.root={data}"] + FAST), out_dir=out)
    cls = transformers.AutoModelForImageClassification
    reference = cls.from_pretrained(str(folder)).eval()  # the library's defaults (SDPA where it applies)
    processor = transformers.AutoImageProcessor.from_pretrained(str(folder))
    rows = read_predictions(out)
    assert len(rows) == 9
    with torch.no_grad():
        for row in rows:
            inputs = processor(images=Image.open(data / row["path"]).convert("RGB"), return_tensors="pt")
            logits = reference(**inputs).logits[0]  # (3,)
            assert int(row["top1_index"]) == int(logits.argmax()), row["path"]
            assert row["top1_name"] == reference.config.id2label[int(logits.argmax())]
    manifest = json.loads((out / "results" / "manifest.json").read_text())
    assert manifest["model"]["library"] == "transformers" and manifest["model"]["source"] == "hf"
    assert manifest["model"]["weights_file"] == str(folder / "model.safetensors")
    assert manifest["versions"]["transformers"] == transformers.__version__


def test_hf_wrapper_returns_logits_eager_and_keeps_module_names(tmp_path):
    folder = save_hf_vit(tmp_path / "vit")
    loaded = load_model(model_cfg(source="hf", path=str(folder)))
    assert isinstance(loaded.module, HFClassifier)
    assert loaded.module.model.config._attn_implementation == "eager"  # SDPA would return no attention weights
    names = dict(loaded.module.named_modules())
    inner = dict(loaded.module.model.named_modules())
    assert all(f"model.{n}" in names for n in inner if n)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded.module(x), loaded.module.model(pixel_values=x).logits)
    assert loaded.class_names == ["cat", "dog", "eel"]


def test_hf_generic_labels_ignored_and_random_weights(tmp_path):
    folder = save_hf_vit(tmp_path / "vit", num_labels=4)  # transformers names them LABEL_0 .. LABEL_3
    loaded = load_model(model_cfg(source="hf", path=str(folder), weights=None))
    assert loaded.class_names == [] and loaded.random_init and loaded.weights_file is None


def test_hf_hub_id_from_seeded_cache_and_offline_error(tmp_path, offline_hub):
    folder = save_hf_vit(tmp_path / "saved")
    with pytest.raises(ModelLoadError) as info:
        load_model(model_cfg(source="hf", name="someorg/tiny-vit"))
    message = str(info.value)
    assert "someorg/tiny-vit" in message and "config.json" in message and "model.weights=null" in message
    assert str(offline_hub / "models--someorg--tiny-vit") in message
    snapshot = seed_hub_repo(offline_hub, "someorg/tiny-vit",
                             {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()})
    loaded = load_model(model_cfg(source="hf", name="someorg/tiny-vit"))
    assert loaded.name == "someorg/tiny-vit" and loaded.weights_file == str(snapshot / "model.safetensors")
    assert loaded.preprocess.crop_mode == "squash" and loaded.class_names == ["cat", "dog", "eel"]
    reference = transformers.AutoModelForImageClassification.from_pretrained(str(folder)).eval()
    for key, value in reference.state_dict().items():
        assert torch.equal(loaded.module.model.state_dict()[key], value), key


def test_hf_multi_label_head_and_missing_processor(tmp_path):
    folder = tmp_path / "vit"
    config = transformers.ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                                    image_size=48, patch_size=16, num_labels=3,
                                    problem_type="multi_label_classification")
    transformers.ViTForImageClassification(config).save_pretrained(folder)  # no preprocessor_config.json
    loaded = load_model(model_cfg(source="hf", path=str(folder)))
    assert loaded.multi_label
    assert (loaded.preprocess.resize, loaded.preprocess.crop) == (54, 48)  # the model's image_size, ImageNet recipe
    assert any("no preprocessor_config.json" in note for note in loaded.notes)


def test_hf_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="model.name"):
        validate(compose_config(["model=hf"]))
    with pytest.raises(ConfigError, match="config.json"):
        validate(compose_config(["model=hf", f"model.path={tmp_path}"]))
