"""`model=hf`: a Hugging Face transformers image classifier, from a `save_pretrained` folder (`model.path`) or a hub
id in the local cache (`model.name`), with its image processor's preprocessing and `config.id2label` names.

The module is built with `attn_implementation="eager"`: the SDPA kernel transformers uses by default never forms the
attention weights, so `output_attentions` would return nothing. It is wrapped in `HFClassifier` so that calling it
returns the logits tensor, like every other source; the transformers module stays reachable as its `model`
attribute, so its layers keep their own names under `model.` (e.g. `model.vit.layers.11.layernorm_before` in transformers 5).
"""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
from omegaconf import DictConfig, OmegaConf

from reportgen.errors import ConfigError, ModelLoadError
from reportgen.inputs.hub_cache import cached_file, find_or_fetch, require
from reportgen.inputs.labels import imagenet_synsets
from reportgen.inputs.loaded_model import LoadedModel
from reportgen.inputs.preprocess import Preprocess

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
# PIL's resampling codes, which image processors store as `resample`
PIL_RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}
GENERIC_LABEL = re.compile(r"^LABEL_\d+$")  # what transformers names outputs when the config names none


class HFClassifier(torch.nn.Module):
    """Calls a transformers image classifier with `pixel_values` and returns its `.logits` (B, num_labels)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model  # the transformers module; its submodules are named `model.<their own names>`

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=pixel_values).logits  # (B, num_labels)


class HFBackbone(torch.nn.Module):
    """Calls a transformers image backbone (Dinov2Model, ViTModel, CLIPVisionModel, ResNetModel, ...) with
    `pixel_values` and returns its embedding (B, D), read as `pool` says (decided at load by `_backbone_facts`):
    `image_embeds` (CLIP's `...WithProjection`), `pooler_output` (DINOv2, CLIP, BEiT, ConvNeXt; a (B, C, 1, 1)
    pooled map, as ResNet's, flattened) or `class_token` (the first token of `last_hidden_state`, after the final
    layernorm: ViT's pooler is a dense + tanh that DINO's and MSN's checkpoints do not train or ship)."""

    def __init__(self, model: torch.nn.Module, pool: str = "pooler_output"):
        super().__init__()
        self.model = model
        self.pool = pool

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        out = self.model(pixel_values=pixel_values)
        if self.pool == "class_token":
            return out.last_hidden_state[:, 0]  # (B, D)
        pooled = getattr(out, self.pool)  # (B, D), or (B, C, 1, 1) for CNN backbones
        return pooled.flatten(1) if pooled.dim() == 4 and pooled.shape[2:] == (1, 1) else pooled


class HFSegmenter(torch.nn.Module):
    """Calls a transformers semantic segmentation model (SegFormer, DPT, UperNet, BEiT, ...) with `pixel_values` and
    returns its `.logits` (B, num_labels, h, w), at the model's own output resolution (SegFormer: a quarter of the
    input); the analyses bring them to each image's size as the processor's `post_process_semantic_segmentation`
    does (bilinear, then argmax)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=pixel_values).logits  # (B, K, h, w)


class HFDetector(torch.nn.Module):
    """Calls a transformers object detector (DETR, Conditional / Deformable DETR, RT-DETR, ...) with
    `pixel_values` and returns torchvision's output, one dict of `boxes` (xyxy in the input's pixels), `scores` and
    `labels` per image, from the processor's own `post_process_object_detection` (threshold 0: the analyses choose
    what to keep). The analyses bring the boxes to each image's own size."""

    def __init__(self, model: torch.nn.Module, post_process: Any):
        super().__init__()
        self.model = model
        self.post_process = post_process  # the image processor's post_process_object_detection

    def forward(self, pixel_values: torch.Tensor) -> List[Dict[str, torch.Tensor]]:
        out = self.model(pixel_values=pixel_values)
        height, width = pixel_values.shape[-2:]
        found = self.post_process(out, threshold=0.0, target_sizes=[(height, width)] * pixel_values.shape[0])
        return [{"boxes": f["boxes"], "scores": f["scores"], "labels": f["labels"]} for f in found]


ZERO_SHOT_TYPES = {"clip", "siglip", "siglip2"}  # image-text models: zero-shot classifiers of the folder's classes


def model_kind(config: Any) -> str:
    """`zero_shot` (CLIPModel, SiglipModel), `backbone` (a `...Model` / `...VisionModel...` without a head),
    `segmenter` (`...ForSemanticSegmentation`), `universal` (`...ForUniversalSegmentation`: Mask2Former, OneFormer)
    or `classifier`, from the config's model type and the architectures save_pretrained recorded."""
    model_type = str(getattr(config, "model_type", ""))
    architectures = list(getattr(config, "architectures", None) or [])
    if any(a.endswith("ForSemanticSegmentation") for a in architectures):
        return "segmenter"
    if any(a.endswith(("ForUniversalSegmentation", "ForInstanceSegmentation")) for a in architectures):
        return "universal"
    if any(a.endswith("ForObjectDetection") for a in architectures):
        return "detector"
    if any(a.endswith("ForImageClassification") for a in architectures):  # fine-tuned, CLIP's and SigLIP's too
        return "classifier"
    if model_type in ZERO_SHOT_TYPES:
        return "zero_shot"
    if model_type.endswith("_vision_model") or any(a.endswith(("Model", "ModelWithProjection"))
                                                    for a in architectures):
        return "backbone"
    return "classifier"


def locate_hf(cfg: DictConfig) -> Tuple[str, Path, str, Optional[Path]]:
    """(kind, folder holding config.json, display name, weights file or None) of the `model=hf` model, kind being
    `classifier`, `backbone` or `zero_shot` (a CLIP-like model, loaded by clip_models.py)."""
    transformers = require("transformers", "hf", "model=hf (Hugging Face transformers)")
    folder, label, weights_file = _locate(cfg)
    try:
        kind = model_kind(transformers.AutoConfig.from_pretrained(str(folder)))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"transformers could not read the config of {label}: {type(exc).__name__}: {exc}") from exc
    return kind, folder, label, weights_file


def load_hf(cfg: DictConfig) -> LoadedModel:
    """Build a classifier or a backbone (task embedding), pretrained or random from its config with
    model.weights=null, and its facts."""
    transformers = require("transformers", "hf", "model=hf (Hugging Face transformers)")
    kind, folder, label, weights_file = locate_hf(cfg)
    kwargs = dict(OmegaConf.to_container(cfg.kwargs, resolve=True)) if cfg.kwargs else {}
    if kind == "backbone":
        return _load_backbone(transformers, cfg, folder, label, weights_file, kwargs)
    if kind == "universal":
        raise ModelLoadError(f"{label} is a mask-classification model (Mask2Former, MaskFormer, OneFormer: "
                             f"{', '.join(_architectures(folder, transformers))}): not supported yet, because its "
                             f"processor pads each batch and its semantic post-processing resizes the padded output; "
                             f"reportgen takes transformers models with a ...ForSemanticSegmentation head (SegFormer, "
                             f"DPT, UperNet, BEiT)")
    if kind == "segmenter":
        return _load_segmenter(transformers, cfg, folder, label, weights_file, kwargs)
    if kind == "detector":
        return _load_detector(transformers, cfg, folder, label, weights_file, kwargs)
    try:
        config = transformers.AutoConfig.from_pretrained(str(folder), **kwargs) if weights_file is None else None
        module = build_eager(transformers.AutoModelForImageClassification, config, folder, weights_file, kwargs)
    except ValueError as exc:  # a config whose model type has no image-classification class
        raise ModelLoadError(f"transformers cannot build an image classifier from {label}: {exc}\n"
                             f"  model=hf takes models of AutoModelForImageClassification (ViT, DeiT, BEiT, ConvNeXt, "
                             f"Swin, ResNet, ...); other heads are not supported") from exc
    except (OSError, TypeError, RuntimeError) as exc:
        raise ModelLoadError(f"transformers could not load {label}: {type(exc).__name__}: {exc}") from exc
    config = module.config
    channels = int(getattr(config, "num_channels", 3) or 3)
    base, notes = processor_preprocess(folder, channels, cfg.preprocess, getattr(config, "image_size", None))
    names = [str(config.id2label[i]) for i in sorted(config.id2label)] if config.id2label else []
    if names and all(GENERIC_LABEL.match(n) for n in names):
        names = []  # LABEL_0, LABEL_1, ...: the config names no class
    num_labels = int(config.num_labels)
    return LoadedModel(
        module=HFClassifier(module), name=label, source="hf", library="transformers",
        weights=f"pretrained {weights_file.name}" if weights_file is not None else "random initialisation",
        weights_file=str(weights_file) if weights_file is not None else None,
        random_init=weights_file is None,
        preprocess=Preprocess.resolve(cfg.preprocess, base, source="the image processor config"),
        class_names=names, notes=notes,
        synsets=imagenet_synsets() if num_labels == 1000 else [],
        multi_label=getattr(config, "problem_type", None) == "multi_label_classification",
        task="classification", task_reason=f"transformers {type(module).__name__} (an image classification head)",
    )


def build_eager(model_class: Any, config: Any, folder: Path, weights_file: Optional[Path],
                kwargs: Dict[str, Any]) -> torch.nn.Module:
    """`model_class` from `folder` with eager attention (so attention weights exist): random from `config` without a
    weights file, else pretrained. The caller turns the libraries' errors into its own message."""
    if weights_file is None:
        return model_class.from_config(config, attn_implementation="eager")
    return model_class.from_pretrained(str(folder), attn_implementation="eager", **kwargs)


def architecture_class(transformers: Any, config: Any) -> Any:
    """The transformers class save_pretrained recorded (config.architectures[0]), or None."""
    architectures = list(getattr(config, "architectures", None) or [])
    return getattr(transformers, architectures[0], None) if architectures else None


def _load_backbone(transformers: Any, cfg: DictConfig, folder: Path, label: str, weights_file: Optional[Path],
                   kwargs: Dict[str, Any]) -> LoadedModel:
    """A transformers image backbone (task embedding), built with its own class (config.architectures) or AutoModel,
    eager attention so its attention weights exist."""
    config = transformers.AutoConfig.from_pretrained(str(folder), **kwargs)
    model_class = architecture_class(transformers, config) or transformers.AutoModel
    try:
        module = build_eager(model_class, config, folder, weights_file, kwargs)
    except (OSError, TypeError, ValueError, RuntimeError) as exc:
        raise ModelLoadError(f"transformers could not load the backbone {label}: {type(exc).__name__}: {exc}") from exc
    config = module.config
    channels = int(getattr(config, "num_channels", 3) or 3)
    base, notes = processor_preprocess(folder, channels, cfg.preprocess, getattr(config, "image_size", None))
    pooling, token_layer, prefix, pool = _backbone_facts(module)
    return LoadedModel(
        module=HFBackbone(module, pool), name=label, source="hf", library="transformers",
        weights=f"pretrained {weights_file.name}" if weights_file is not None else "random initialisation",
        weights_file=str(weights_file) if weights_file is not None else None, random_init=weights_file is None,
        preprocess=Preprocess.resolve(cfg.preprocess, base, source="the image processor config"),
        class_names=[], notes=notes, task="embedding",
        task_reason=f"transformers {type(module).__name__} is a backbone (no classification head)",
        pooling=pooling, token_layer=token_layer, prefix_tokens=prefix)


def _load_segmenter(transformers: Any, cfg: DictConfig, folder: Path, label: str, weights_file: Optional[Path],
                    kwargs: Dict[str, Any]) -> LoadedModel:
    """A transformers semantic segmentation model (task segmentation), built with AutoModelForSemanticSegmentation;
    class names from `id2label`."""
    try:
        config = transformers.AutoConfig.from_pretrained(str(folder), **kwargs) if weights_file is None else None
        module = build_eager(transformers.AutoModelForSemanticSegmentation, config, folder, weights_file, kwargs)
    except (OSError, TypeError, ValueError, RuntimeError) as exc:
        raise ModelLoadError(f"transformers could not load the segmentation model {label}: {type(exc).__name__}: "
                             f"{exc}") from exc
    config = module.config
    channels = int(getattr(config, "num_channels", 3) or 3)
    base, notes = processor_preprocess(folder, channels, cfg.preprocess, getattr(config, "image_size", None))
    names = [str(config.id2label[i]) for i in sorted(config.id2label)] if config.id2label else []
    return LoadedModel(
        module=HFSegmenter(module), name=label, source="hf", library="transformers",
        weights=f"pretrained {weights_file.name}" if weights_file is not None else "random initialisation",
        weights_file=str(weights_file) if weights_file is not None else None, random_init=weights_file is None,
        preprocess=Preprocess.resolve(cfg.preprocess, base, source="the image processor config"),
        class_names=[] if names and all(GENERIC_LABEL.match(n) for n in names) else names, notes=notes,
        task="segmentation",
        task_reason=f"transformers {type(module).__name__} (a semantic segmentation head)")


def _load_detector(transformers: Any, cfg: DictConfig, folder: Path, label: str, weights_file: Optional[Path],
                   kwargs: Dict[str, Any]) -> LoadedModel:
    """A transformers object detector (task detection), built with AutoModelForObjectDetection; its processor gives
    the preprocessing (DETR's shortest_edge / longest_edge resize, without the crop: `whole` with `max_size`) and
    the post-processing; class names from `id2label` ('N/A' for the ids it skips, as COCO's 91 do)."""
    if not (folder / "preprocessor_config.json").is_file():
        raise ModelLoadError(f"{label} has no preprocessor_config.json: a transformers detector needs its image "
                             f"processor (its resize and its post-processing); save it with the model")
    try:
        config = transformers.AutoConfig.from_pretrained(str(folder), **kwargs) if weights_file is None else None
        module = build_eager(transformers.AutoModelForObjectDetection, config, folder, weights_file, kwargs)
        processor = transformers.AutoImageProcessor.from_pretrained(str(folder))
    except (OSError, TypeError, ValueError, RuntimeError) as exc:
        raise ModelLoadError(f"transformers could not load the detector {label}: {type(exc).__name__}: "
                             f"{exc}") from exc
    config = module.config
    channels = int(getattr(config, "num_channels", 3) or 3)
    size = _size(getattr(processor, "size", None))
    interpolation = PIL_RESAMPLE.get(int(getattr(processor, "resample", 2) or 2), "bilinear")
    mean, std = _per_channel(processor.image_mean, channels), _per_channel(processor.image_std, channels)
    if size.get("shortest_edge"):
        base = Preprocess(resize=int(size["shortest_edge"]), crop=int(size["shortest_edge"]), crop_mode="whole",
                          max_size=int(size.get("longest_edge") or 0), interpolation=interpolation, mean=mean, std=std,
                          channels=channels)
    elif size.get("height") and size.get("width") and size["height"] == size["width"]:
        base = Preprocess(resize=int(size["height"]), crop=int(size["height"]), crop_mode="squash",
                          interpolation=interpolation, mean=mean, std=std, channels=channels)
    else:
        raise ModelLoadError(f"the image processor of {label} resizes to {size}: not supported for detectors yet "
                             f"(supported: shortest_edge / longest_edge, or a square height and width)")
    if not getattr(processor, "do_normalize", True):
        base = dataclasses.replace(base, mean=(0.0,) * channels, std=(1.0,) * channels)
    ids = sorted(int(i) for i in (config.id2label or {}))
    names = ["N/A"] * (ids[-1] + 1 if ids else 0)
    for i in ids:
        names[i] = str(config.id2label[i])
    return LoadedModel(
        module=HFDetector(module, processor.post_process_object_detection), name=label, source="hf",
        library="transformers",
        weights=f"pretrained {weights_file.name}" if weights_file is not None else "random initialisation",
        weights_file=str(weights_file) if weights_file is not None else None, random_init=weights_file is None,
        preprocess=Preprocess.resolve(cfg.preprocess, base, source="the image processor config"),
        class_names=[] if names and all(GENERIC_LABEL.match(n) for n in names if n != "N/A") else names,
        task="detection", task_reason=f"transformers {type(module).__name__} (an object detection head)")


def _architectures(folder: Path, transformers: Any) -> List[str]:
    return list(getattr(transformers.AutoConfig.from_pretrained(str(folder)), "architectures", None) or [])


def _backbone_facts(module: torch.nn.Module) -> Tuple[str, Optional[str], int, str]:
    """(how the backbone pools, the module whose output is its final (B, prefix + N, D) tokens, prefix tokens, which
    output HFBackbone returns), with names as they are inside HFBackbone (`model.` + the module's own names)."""
    config = module.config
    names = dict(module.named_modules())
    kind = type(module).__name__
    prefix = 1 + int(getattr(config, "num_register_tokens", 0) or 0)  # class token + DINOv2's registers
    if kind.startswith("ViTMAE"):
        raise ModelLoadError(f"{kind} shuffles and masks its patches at random in every forward (mask_ratio "
                             f"{getattr(config, 'mask_ratio', '?')}), so its embeddings would change from run to run: "
                             f"not supported as a backbone. Load its encoder weights into a ViTModel instead")
    if "vision_model.encoder" in names:  # CLIP / SigLIP towers: post_layernorm sees only the pooled token
        projected = "visual_projection" in names
        pooling = ("the class token after post_layernorm" if "vision_model.head" not in names
                   else "attention pooling of the patch tokens (SigLIP's head)")
        if "vision_model.head" in names:
            prefix = 0  # SigLIP has no class token
        pooling += ", projected to the image-text space" if projected else ""
        return pooling, "model.vision_model.encoder", prefix, "image_embeds" if projected else "pooler_output"
    pooler = names.get("pooler")
    if "layernorm" in names and (pooler is None or hasattr(pooler, "dense")):  # ViT, DeiT, MSN, DINO, DINOv2
        why = "" if pooler is None else " (the pooler's dense layer and tanh are left out: DINO's and MSN's " \
                                         "checkpoints do not train or ship them)"
        pool = "pooler_output" if kind.startswith("Dinov2") else "class_token"  # DINOv2's pooler_output is that
        return "the class token after the final layernorm" + why, "model.layernorm", prefix, pool
    if pooler is not None:  # BEiT's mean of the patch tokens, ConvNeXt's and ResNet's pooled feature map
        return f"the model's pooler_output ({type(pooler).__name__})", None, prefix, "pooler_output"
    return "the class token of the last hidden state", None, prefix, "class_token"


def _locate(cfg: DictConfig) -> Tuple[Path, str, Optional[Path]]:
    """(folder holding config.json, display name, weights file or None for random init)."""
    random = cfg.weights is None
    if cfg.weights is not None and cfg.weights != "DEFAULT":
        raise ConfigError("model.weights", cfg.weights, "DEFAULT (the folder's or cached weights) or null (random)",
                          ["DEFAULT", "null"])
    if cfg.path:
        folder = Path(cfg.path)
        if not (folder / "config.json").is_file():
            raise ConfigError("model.path", str(folder), "a save_pretrained folder with config.json (and "
                              "model.safetensors, preprocessor_config.json)")
        if random:
            return folder, folder.name, None
        weights = next((folder / f for f in WEIGHT_FILES if (folder / f).is_file()), None)
        if weights is None:
            raise ModelLoadError(f"{folder} has config.json but no weights ({' or '.join(WEIGHT_FILES)}); "
                                 f"sharded checkpoints are not supported. Or run with random weights: "
                                 f"model.weights=null")
        return folder, folder.name, weights
    if not cfg.name:
        raise ConfigError("model.name", cfg.name, "a Hugging Face hub id such as google/vit-base-patch16-224 (from "
                          "the local cache), or set model.path to a save_pretrained folder")
    repo = str(cfg.name)
    what = f"model.name={repo}"
    config_file = find_or_fetch(repo, ["config.json"], what)
    if random:
        return config_file.parent, repo, None
    weights = find_or_fetch(repo, WEIGHT_FILES, what)
    if cached_file(repo, "preprocessor_config.json") is None:
        try:
            find_or_fetch(repo, ["preprocessor_config.json"], what)
        except ModelLoadError:
            pass  # the preprocessing then has to come from model.preprocess (processor_preprocess says so)
    return weights.parent, repo, weights


def processor_preprocess(folder: Path, channels: int, overrides: Any, image_size: Any = None
                         ) -> Tuple[Optional[Preprocess], List[str]]:
    """The image processor's resize/crop/normalisation as a Preprocess; without a processor config, ImageNet's
    recipe at the model's `image_size` (crop = image_size, resize = image_size / 0.875), with a note."""
    if not (folder / "preprocessor_config.json").is_file():
        size = int(image_size) if isinstance(image_size, int) else 224
        base = Preprocess(resize=int(size / 0.875), crop=size, channels=channels)  # mean/std checked by resolve
        return base, [f"{folder.name} has no preprocessor_config.json: ImageNet preprocessing at the model's input "
                      f"size (resize {base.resize}, crop {base.crop}, ImageNet mean/std) was used; set "
                      f"model.preprocess.* to what the model was trained with"]
    transformers = require("transformers", "hf", "model=hf (Hugging Face transformers)")
    processor = transformers.AutoImageProcessor.from_pretrained(str(folder))
    try:
        return processor_to_preprocess(processor, channels), []
    except ValueError as exc:
        if overrides is not None and overrides.get("resize") is not None and overrides.get("crop") is not None:
            return None, [f"the image processor's geometry is not supported ({exc}); model.preprocess.resize/crop "
                          f"are used"]
        raise ModelLoadError(f"the image processor of {folder} cannot be reproduced: {exc}.\n"
                             f"  Set model.preprocess.resize, crop (and mean, std, interpolation) to what the model "
                             f"expects") from exc


def processor_to_preprocess(processor: Any, channels: int) -> Preprocess:
    """Reproduce a transformers image processor (resize, crop_pct, centre crop, rescale, normalise) or raise
    ValueError naming what is not supported (no resize, non-square sizes, longest-edge sizing, custom rescale)."""
    if not getattr(processor, "do_resize", True):
        raise ValueError("it does not resize (images of different sizes cannot be batched)")
    size = _size(getattr(processor, "size", None))
    crop = _size(getattr(processor, "crop_size", None)) if getattr(processor, "do_center_crop", False) else {}
    crop_pct = getattr(processor, "crop_pct", None)
    interpolation = PIL_RESAMPLE.get(int(getattr(processor, "resample", 2) or 2), "bilinear")
    if size.get("shortest_edge") and crop_pct and type(processor).__name__.startswith("ConvNext"):
        edge = int(size["shortest_edge"])
        if edge < 384:  # ConvNeXt: shorter side to int(edge / crop_pct), centre crop edge
            geometry = dict(resize=int(edge / crop_pct), crop=edge, crop_mode="center")
        else:  # at 384 and above it warps to edge x edge without cropping
            geometry = dict(resize=edge, crop=edge, crop_mode="squash")
    elif size.get("shortest_edge"):
        if not crop:
            raise ValueError("size.shortest_edge without a centre crop gives images of different shapes")
        geometry = dict(resize=int(size["shortest_edge"]), crop=_square(crop, "crop_size"), crop_mode="center")
    elif size.get("height"):
        side = _square(size, "size")
        geometry = dict(resize=side, crop=_square(crop, "crop_size") if crop else side, crop_mode="squash")
    else:
        raise ValueError(f"size {size} (only shortest_edge or height/width sizes are supported)")
    if not getattr(processor, "do_rescale", True) or abs(float(processor.rescale_factor) - 1 / 255) > 1e-9:
        raise ValueError("it does not rescale pixel values by 1/255")
    if getattr(processor, "do_normalize", True):
        mean, std = _per_channel(processor.image_mean, channels), _per_channel(processor.image_std, channels)
    else:
        mean, std = (0.0,) * channels, (1.0,) * channels
    return Preprocess(mean=mean, std=std, interpolation=interpolation, channels=channels, crop_offset="floor",
                      **geometry)


def _size(value: Any) -> Dict[str, Any]:
    """A processor's size (dict, SizeDict or int) as a plain dict of the keys that are set."""
    if value is None:
        return {}
    if isinstance(value, int):
        return {"height": value, "width": value}
    keys = ("height", "width", "shortest_edge", "longest_edge")
    get = value.get if isinstance(value, dict) else (lambda k: getattr(value, k, None))
    return {k: get(k) for k in keys if get(k) is not None}


def _square(size: Dict[str, Any], key: str) -> int:
    if size.get("height") != size.get("width") or size.get("longest_edge"):
        raise ValueError(f"{key} {size} is not square (only square model inputs are supported)")
    return int(size["height"])


def _per_channel(values: Any, channels: int) -> Tuple[float, ...]:
    values = [float(v) for v in (values if isinstance(values, (list, tuple)) else [values])]
    return tuple(values * channels) if len(values) == 1 else tuple(values)
