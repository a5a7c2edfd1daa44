"""Zero-shot CLIP classification (reportgen/inputs/clip_models.py): the report's top-1 per image equals what each
library computes itself (open_clip's build_zero_shot_classifier + encode_image; transformers' get_text_features +
get_image_features) on images preprocessed by the library's own transforms, with tiny random models saved to files.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from reportgen.errors import ConfigError, ModelLoadError
from reportgen.inputs.models import load_model
from reportgen.runs.pipeline import run
from tests.helpers import compose_config, make_colour_folder

open_clip = pytest.importorskip("open_clip")
transformers = pytest.importorskip("transformers")

TINY_CLIP = "reportgen-test-tiny-clip"  # registered with open_clip below
TINY_CONFIG = {"embed_dim": 16,
               "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "patch_size": 8, "head_width": 16},
               "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2}}
FAST = ["runtime.num_workers=0", "runtime.progress=false"]
ANALYSES = "analysis=[summary,predictions,gradcam,attention]"


@pytest.fixture(scope="module")
def tiny_open_clip(tmp_path_factory) -> Path:
    """A tiny random open_clip CLIP (ViT 32 px, patch 8) registered by name, its state dict saved to a file."""
    folder = tmp_path_factory.mktemp("open_clip")
    (folder / f"{TINY_CLIP}.json").write_text(json.dumps(TINY_CONFIG))
    open_clip.add_model_config(folder / f"{TINY_CLIP}.json")
    torch.manual_seed(0)
    model = open_clip.create_model(TINY_CLIP)
    torch.save(model.state_dict(), folder / "tiny_clip.pt")
    return folder / "tiny_clip.pt"


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    return make_colour_folder(tmp_path_factory.mktemp("zs") / "images", per_class=3, noise=40, seed=3)


def image_paths(root: Path) -> List[Path]:
    return sorted(p for p in root.rglob("*.png"))


def top1_by_file(out: Path) -> Dict[str, Tuple[str, float]]:
    """predictions.csv: file name -> (predicted class name, its probability)."""
    with open(out / "results" / "predictions.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    return {Path(row["path"]).name: (row["top1_name"], float(row["top1_prob"])) for row in rows}


def assert_same_top1(out: Path, paths: List[Path], names: List[str], logits: torch.Tensor) -> None:
    """The report's top-1 class per image is the oracle's, and its probability the oracle's softmax."""
    probs, index = logits.softmax(dim=1).max(dim=1)  # (N,), (N,)
    report = top1_by_file(out)
    assert {p.name: report[p.name][0] for p in paths} == {p.name: names[i] for p, i in zip(paths, index.tolist())}
    assert np.allclose([report[p.name][1] for p in paths], probs.numpy(), atol=1e-4)


def class_embeddings(text_features, names: List[str], templates: List[str]) -> torch.Tensor:
    """(D, K) by hand: each prompt normalised, averaged per class, normalised again (the oracle for transformers)."""
    columns = []
    for name in names:
        features = F.normalize(text_features([t.format(name) for t in templates]), dim=-1)  # (T, D)
        columns.append(F.normalize(features.mean(dim=0), dim=-1))  # (D,)
    return torch.stack(columns, dim=1)  # (D, K)


def test_open_clip_end_to_end_matches_open_clip(tiny_open_clip, images, tmp_path):
    """The whole pipeline (predictions, Grad-CAM on the image tower, attention) agrees with open_clip's own
    zero-shot recipe, image by image, and the manifest names the prompts."""
    prompts = ["a photo of a {}.", "a {} thing."]
    cfg = compose_config(["model=open_clip", f"model.name={TINY_CLIP}", f"model.path={tiny_open_clip}",
                          f"model.prompts=[{','.join(repr(p) for p in prompts)}]", f"dataset.root={images}",
                          ANALYSES, *FAST])
    out = tmp_path / "run"
    run(cfg, out_dir=out)
    model, _, val = open_clip.create_model_and_transforms(TINY_CLIP, pretrained=str(tiny_open_clip))
    model.eval()
    names = ["blue", "green", "red"]  # the folder classes, sorted
    classifier = open_clip.build_zero_shot_classifier(model, open_clip.get_tokenizer(TINY_CLIP), names, prompts)
    paths = image_paths(images)
    with torch.no_grad():
        batch = torch.stack([val(Image.open(p)) for p in paths])  # (N, 3, 32, 32)
        logits = model.logit_scale.exp() * model.encode_image(batch, normalize=True) @ classifier  # (N, K)
    assert_same_top1(out, paths, names, logits)
    manifest = json.loads((out / "results" / "manifest.json").read_text())
    assert manifest["model"]["task"] == "classification"
    assert manifest["model"]["zero_shot"]["prompts"] == prompts
    assert manifest["model"]["zero_shot"]["classes_from"] == "folder names"
    assert "a {} thing." in (out / "report" / "index.html").read_text()


def tiny_hf_clip_folder(folder: Path, siglip: bool = False) -> Path:
    """A tiny random transformers CLIPModel (or SiglipModel) save_pretrained folder with a byte-level CLIP tokenizer
    (a vocabulary of single characters, no merges) and an image processor."""
    from tokenizers.pre_tokenizers import ByteLevel

    byte_chars = sorted(ByteLevel.alphabet())  # the 256 characters byte-level BPE maps bytes to
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for char in byte_chars:
        vocab.setdefault(char, len(vocab))
        vocab.setdefault(char + "</w>", len(vocab))
    text = dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=2, max_position_embeddings=24, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32,
                  patch_size=8)
    torch.manual_seed(1)
    if siglip:
        config = transformers.SiglipConfig(text_config=text, vision_config=vision)
        model = transformers.SiglipModel(config)
        processor = transformers.SiglipImageProcessor(size={"height": 32, "width": 32})
    else:
        config = transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)
        model = transformers.CLIPModel(config)
        processor = transformers.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    transformers.CLIPTokenizer(vocab=vocab, merges=[]).save_pretrained(folder)
    return folder


def hf_oracle(folder: Path, names: List[str], templates: List[str], paths: List[Path]) -> torch.Tensor:
    """(N, K) logits per image from the folder's own model, tokenizer and image processor."""
    model = transformers.AutoModel.from_pretrained(str(folder)).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder))
    processor = transformers.AutoImageProcessor.from_pretrained(str(folder))
    siglip = getattr(model, "logit_bias", None) is not None

    def text_features(texts: List[str]) -> torch.Tensor:
        tokens = tokenizer(texts, padding="max_length" if siglip else True, truncation=True,
                           max_length=model.config.text_config.max_position_embeddings, return_tensors="pt")
        out = model.get_text_features(**{k: tokens[k] for k in ("input_ids", "attention_mask") if k in tokens})
        return out if isinstance(out, torch.Tensor) else out.pooler_output  # (T, D)

    with torch.no_grad():
        classifier = class_embeddings(text_features, names, templates)  # (D, K)
        pixels = processor(images=[Image.open(p).convert("RGB") for p in paths], return_tensors="pt")["pixel_values"]
        out = model.get_image_features(pixel_values=pixels)
        features = F.normalize(out if isinstance(out, torch.Tensor) else out.pooler_output, dim=-1)  # (N, D)
        logits = model.logit_scale.exp() * features @ classifier  # (N, K)
        if siglip:
            logits = logits + model.logit_bias
    return logits


def test_transformers_clip_folder_end_to_end_matches_get_features(images, tmp_path):
    """model=hf with a CLIPModel folder: the report's top-1 equals get_text_features / get_image_features."""
    folder = tiny_hf_clip_folder(tmp_path / "clip")
    prompts = ["a photo of a {}.", "the colour {}, seen from very far away in the fog"]
    cfg = compose_config(["model=hf", f"model.path={folder}", f"dataset.root={images}",
                          f"model.prompts=[{','.join(repr(p) for p in prompts)}]",
                          "analysis=[summary,predictions,gradcam]", *FAST])
    out = tmp_path / "run"
    run(cfg, out_dir=out)
    paths = image_paths(images)
    names = ["blue", "green", "red"]
    assert_same_top1(out, paths, names, hf_oracle(folder, names, prompts, paths))
    manifest = json.loads((out / "results" / "manifest.json").read_text())
    assert manifest["model"]["task"] == "classification"
    assert manifest["model"]["zero_shot"]["prompts"] == prompts


def test_siglip_folder_logits_equal_its_own(images, tmp_path):
    """A SiglipModel folder (no projection, a logit bias, prompts padded to full length) scores as the model does."""
    folder = tiny_hf_clip_folder(tmp_path / "siglip", siglip=True)
    cfg = compose_config(["model=hf", f"model.path={folder}", "model.class_names=[red,green,blue]"])
    loaded = load_model(cfg.model, [])
    assert loaded.zero_shot["classes_from"] == "model.class_names" and loaded.module.bias is not None
    assert any("sigmoid" in note for note in loaded.notes)
    paths = image_paths(images)
    batch = torch.stack([loaded.preprocess.to_uint8(Image.open(p)) for p in paths])  # (N, 3, 32, 32) uint8
    with torch.no_grad():
        logits = loaded.module(loaded.preprocess.normalize(batch))  # (N, 3)
    expected = hf_oracle(folder, ["red", "green", "blue"], ["a photo of a {}."], paths)
    assert torch.equal(logits.argmax(dim=1), expected.argmax(dim=1))
    assert torch.allclose(logits, expected, atol=1e-4)


def test_prompts_class_names_and_wordnet_folders(tiny_open_clip, tmp_path):
    """'imagenet' gives the CLIP paper's 80 templates; a template without {} and a run without class names are
    ConfigErrors naming their keys; WordNet-id folders are scored by their synset names; labels_file is read."""
    base = ["model=open_clip", f"model.name={TINY_CLIP}", f"model.path={tiny_open_clip}"]
    loaded = load_model(compose_config(base + ["model.prompts=imagenet"]).model, ["n01440764", "n01443537"])
    assert len(loaded.zero_shot["prompts"]) == 80 and loaded.zero_shot["templates"] == "imagenet"
    assert all("{}" in p for p in loaded.zero_shot["prompts"])
    assert loaded.class_names == ["tench", "goldfish"] and loaded.synsets == ["n01440764", "n01443537"]
    assert loaded.zero_shot["classes_from"] == "folder WordNet ids"
    assert loaded.module(torch.zeros(2, 3, 32, 32)).shape == (2, 2)
    with pytest.raises(ConfigError, match="model.prompts"):
        load_model(compose_config(base + ["model.prompts=[a photo]"]).model, ["cat"])
    with pytest.raises(ConfigError, match="Did you mean 'imagenet'"):
        load_model(compose_config(base + ["model.prompts=imagnet"]).model, ["cat"])
    with pytest.raises(ConfigError, match="model.class_names"):
        load_model(compose_config(base).model, [])
    labels = tmp_path / "labels.txt"
    labels.write_text("cat\ndog\nbird\n")
    loaded = load_model(compose_config(base + [f"model.labels_file={labels}"]).model, ["x"])
    assert loaded.class_names == ["cat", "dog", "bird"] and loaded.zero_shot["classes_from"] == "model.labels_file"
    assert not loaded.random_init and loaded.library == "open_clip"
    random = load_model(compose_config(base + ["model.weights=null", "model.class_names=[a,b]"]).model, [])
    assert random.random_init and random.weights == "random initialisation"


def test_open_clip_config_errors(tiny_open_clip, tmp_path):
    """An unknown name and a missing weights file are ConfigErrors naming their keys before anything runs; a state
    dict of another architecture is a ModelLoadError naming model.name."""
    from reportgen.config.validate import validate

    root = make_colour_folder(tmp_path / "images", per_class=1, noise=0, seed=0)
    with pytest.raises(ConfigError, match="model.name") as error:
        validate(compose_config(["model=open_clip", "model.name=ViT-B-33", f"dataset.root={root}"]))
    assert "ViT-B-32" in str(error.value)
    with pytest.raises(ConfigError, match="model.path"):
        validate(compose_config(["model=open_clip", f"model.name={TINY_CLIP}", f"model.path={tmp_path / 'no.pt'}",
                                 f"dataset.root={root}"]))
    other = tmp_path / "other.pt"
    torch.save({"visual.proj": torch.zeros(3, 3)}, other)
    with pytest.raises(ModelLoadError, match="model.name"):
        load_model(compose_config(["model=open_clip", f"model.name={TINY_CLIP}", f"model.path={other}",
                                   "model.class_names=[a,b]"]).model, [])
