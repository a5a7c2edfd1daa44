"""`model=timm`: any architecture of `timm.list_models()` by name (optionally `name.tag`), with

- weights: DEFAULT (the pretrained file of timm's pretrained config, read from the local Hugging Face hub cache,
  downloaded only where a network allows), null (random initialisation), or `model.path`, a `.safetensors` / `.pth`
  state dict (e.g. fine-tuned; a different head size or input channel count is read from the file);
- preprocessing from `timm.data.resolve_model_data_config` (input size, crop_pct, crop_mode, interpolation,
  mean, std), which is what `timm.data.create_transform(**data_config)` evaluates with;
- class names from the pretrained config's label names, else timm's bundled ImageNet info for 1k/12k/21k/22k heads.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
from omegaconf import DictConfig, OmegaConf

from reportgen.errors import ConfigError, ModelLoadError
from reportgen.inputs.hub_cache import find_or_fetch, require
from reportgen.inputs.labels import WORDNET_ID
from reportgen.inputs.loaded_model import LoadedModel, first_input_channels
from reportgen.inputs.preprocess import Preprocess
from reportgen.inputs.state_dicts import check_fits, mismatched_keys, read_state_dict

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def import_timm():
    return require("timm", "timm", "model=timm")


def check_timm_name(name: Optional[str]) -> None:
    """ConfigError (with close matches among timm.list_models()) unless timm can build `name` or `name.tag`."""
    timm = import_timm()
    if not name:
        raise ConfigError("model.name", name, "a timm model name such as vit_small_patch16_224", timm.list_models())
    if str(name).startswith(("hf-hub:", "local-dir:")):
        raise ConfigError("model.name", name, "a timm model name, optionally with its tag (name.tag): hf-hub: and "
                          "local-dir: names are not supported (give the timm name; its weights come from the hub "
                          "cache), or a state dict file as model.path")
    arch, _ = timm.models.split_model_name_tag(str(name))
    if not timm.is_model(arch):
        raise ConfigError("model.name", name, "a timm model name (timm.list_models())", timm.list_models())


def load_timm(cfg: DictConfig) -> LoadedModel:
    timm = import_timm()
    check_timm_name(cfg.name)
    name = str(cfg.name)
    kwargs = dict(OmegaConf.to_container(cfg.kwargs, resolve=True)) if cfg.kwargs else {}
    notes: List[str] = []
    weights_file: Optional[Path] = None
    hub_config: Dict[str, Any] = {}
    if cfg.path:
        weights_file = Path(cfg.path)
        module, notes = _from_state_dict(timm, name, weights_file, kwargs, bool(cfg.trust_checkpoint))
        weights = f"checkpoint {weights_file.name}"
    elif cfg.weights is None:
        module = _create(timm, name, False, kwargs)
        weights = "random initialisation"
    elif cfg.weights == "DEFAULT":
        weights_file, hub_config = _cached_pretrained(timm, name)
        overlay = {"file": str(weights_file), "custom_load": False}  # a hub state dict, not the original .npz
        module = _create(timm, name, True, dict(kwargs, pretrained_cfg_overlay=overlay))
        weights = f"pretrained {module.pretrained_cfg.get('hf_hub_id') or name}"
    else:
        raise ConfigError("model.weights", cfg.weights, "DEFAULT (timm's pretrained weights, from the local hub "
                          "cache) or null (random); a file goes to model.path", ["DEFAULT", "null"])
    base = timm_preprocess(timm, module, kwargs)
    class_names, synsets = timm_class_names(timm, module, hub_config)
    loaded = LoadedModel(module=module, name=name, source="timm", library="timm", weights=weights,
                         weights_file=str(weights_file) if weights_file is not None else None,
                         random_init=weights_file is None,
                         preprocess=Preprocess.resolve(cfg.preprocess, base, source="timm's data config"),
                         class_names=class_names, synsets=synsets, notes=notes)
    loaded.task, loaded.task_reason = "classification", f"timm num_classes={getattr(module, 'num_classes', None)}"
    if not getattr(module, "num_classes", 1):  # timm's own word for a backbone: no classifier head
        loaded.task, loaded.task_reason = "embedding", "timm num_classes=0: the model has no classifier head"
        loaded.pooling, loaded.token_layer, loaded.prefix_tokens = timm_backbone_facts(module)
    return loaded


def timm_backbone_facts(module: torch.nn.Module) -> Tuple[str, Optional[str], int]:
    """(how the backbone pools its output, the module whose output is the final (B, prefix + N, D) tokens, the
    prefix tokens: class + distillation + register tokens) from timm's own attributes."""
    pool = getattr(module, "global_pool", None)
    prefix = int(getattr(module, "num_prefix_tokens", 0) or 0)
    names = dict(module.named_modules())
    tokens = "norm" if prefix or getattr(module, "patch_embed", None) is not None else None
    if tokens is not None and tokens not in names:
        tokens = None
    if isinstance(pool, str):  # vision transformers: the pooling is named
        pooling = {"token": "the class token", "avg": "the mean of the patch tokens",
                   "avgmax": "the mean and max of the patch tokens", "max": "the max of the patch tokens",
                   "map": "attention pooling (a learned query)", "": "no pooling (every token)"}.get(pool, pool)
        if pool == "token" and getattr(module, "dist_token", None) is not None:
            pooling = "the mean of the class and distillation tokens"  # DeiT distilled's own forward_head
        if pool == "avg" and "fc_norm" in names and not isinstance(names["fc_norm"], torch.nn.Identity):
            pooling += ", then fc_norm"
        return pooling + " (timm global_pool=" + repr(pool) + ")", tokens, prefix
    kind = getattr(pool, "pool_type", None)  # CNNs: SelectAdaptivePool2d
    return (f"global {kind or 'average'} pooling of the last feature map" if kind != "" else
            "the last feature map, unpooled"), tokens, prefix


def _create(timm: Any, name: str, pretrained: bool, kwargs: Dict[str, Any]) -> torch.nn.Module:
    try:
        return timm.create_model(name, pretrained=pretrained, **kwargs)
    except (TypeError, ValueError, AssertionError) as exc:  # unknown kwarg, impossible sizes
        raise ModelLoadError(f"timm.create_model('{name}', pretrained={pretrained}, **{kwargs}) failed: "
                             f"{type(exc).__name__}: {exc} (check model.kwargs)") from exc
    except RuntimeError as exc:  # a pretrained file that does not fit
        raise ModelLoadError(f"timm could not load the pretrained weights of '{name}': {exc}") from exc


def _cached_pretrained(timm: Any, name: str) -> Tuple[Path, Dict[str, Any]]:
    """The pretrained weights file of `name` in the hub cache (and the repo's config.json, if cached)."""
    pretrained = timm.models.get_pretrained_cfg(name)
    hub_id = getattr(pretrained, "hf_hub_id", None) if pretrained is not None else None
    if not hub_id:
        raise ModelLoadError(f"timm has no Hugging Face hub weights for '{name}' (its pretrained config names "
                             f"none); choose a tagged name from timm.list_models('{name.split('.')[0]}*', "
                             f"pretrained=True), set model.path to a state dict, or run with model.weights=null")
    files = [pretrained.hf_hub_filename] if pretrained.hf_hub_filename else list(WEIGHT_FILES)
    path = find_or_fetch(hub_id, files, f"pretrained weights of timm model '{name}'")
    config_file = path.parent / "config.json"
    hub_config = json.loads(config_file.read_text()) if config_file.is_file() else {}
    return path, hub_config


def _from_state_dict(timm: Any, name: str, path: Path, kwargs: Dict[str, Any], trust: bool):
    """Build `name` for the file's head size and input channels (unless model.kwargs sets them) and load strictly."""
    if not path.is_file():
        raise ConfigError("model.path", str(path), "an existing .safetensors or .pth state dict file")
    state = read_state_dict(path, trust=trust)
    module = _create(timm, name, False, kwargs)
    notes: List[str] = []
    inferred: Dict[str, int] = {}
    expected = module.state_dict()
    mismatched = set(mismatched_keys(state, expected))
    for key, keys in (("num_classes", _head_weights(module)), ("in_chans", _first_conv_weights(module))):
        shown = [k for k in keys if k in mismatched]
        if key in kwargs or not shown:
            continue
        size = int(state[shown[0]].shape[0 if key == "num_classes" else 1])
        inferred[key] = size
        notes.append(f"{key}={size} inferred from the checkpoint's {shown[0]}")
    if inferred:
        module = _create(timm, name, False, dict(kwargs, **inferred))
    check_fits(state, module.state_dict(), path, name,
               "check model.name (and model.kwargs, e.g. num_classes, img_size) against how the checkpoint was made")
    module.load_state_dict(state, strict=True)
    return module, notes


def _head_weights(module: torch.nn.Module) -> List[str]:
    """State-dict keys of the classifier weight(s) named by the pretrained config (DeiT distilled has two)."""
    heads = module.pretrained_cfg.get("classifier") or ()
    return [f"{h}.weight" for h in ((heads,) if isinstance(heads, str) else heads)]


def _first_conv_weights(module: torch.nn.Module) -> List[str]:
    convs = module.pretrained_cfg.get("first_conv") or ()
    return [f"{c}.weight" for c in ((convs,) if isinstance(convs, str) else convs)]


def timm_preprocess(timm: Any, module: torch.nn.Module, kwargs: Dict[str, Any]) -> Preprocess:
    """timm's evaluation transform as a Preprocess: resize = floor(size / crop_pct), crop_mode, interpolation,
    mean, std. `img_size` / `in_chans` given to create_model are passed to the data config as timm's scripts do."""
    args: Dict[str, Any] = {}
    img_size = kwargs.get("img_size")
    if isinstance(img_size, (list, tuple)):
        img_size = img_size[0] if len(set(img_size)) == 1 else tuple(img_size)
    if isinstance(img_size, int):
        args["img_size"] = img_size
    channels = _input_channels(module)
    args["in_chans"] = channels
    config = timm.data.resolve_model_data_config(module, args=args)
    _, height, width = config["input_size"]
    if height != width or isinstance(img_size, tuple):
        raise ModelLoadError(f"timm's data config gives a {height}x{width} input; only square inputs are supported")
    crop_pct = float(config.get("crop_pct") or timm.data.DEFAULT_CROP_PCT)
    return Preprocess(resize=math.floor(height / crop_pct), crop=int(height), crop_mode=config.get("crop_mode") or
                      "center", interpolation=str(config["interpolation"]), mean=tuple(config["mean"]),
                      std=tuple(config["std"]), channels=channels)


def _input_channels(module: torch.nn.Module) -> int:
    """The first conv's (or patch embedding's) input channels, as named by the pretrained config."""
    for key in _first_conv_weights(module):
        try:
            return int(module.get_submodule(key[: -len(".weight")]).in_channels)
        except (AttributeError, TypeError):
            continue
    return first_input_channels(module) or 3


def timm_class_names(timm: Any, module: torch.nn.Module, hub_config: Dict[str, Any]) -> Tuple[List[str], List[str]]:
    """(names, WordNet ids) of the outputs: the pretrained config's label names (descriptions shown where given),
    else timm's ImageNet info for a head of 1k/12k/21k/22k classes; ([], []) when unknown."""
    num_classes = int(getattr(module, "num_classes", 0) or 0)
    pretrained = dict(module.pretrained_cfg)
    labels = hub_config.get("label_names") or pretrained.get("label_names")
    descriptions = hub_config.get("label_descriptions") or pretrained.get("label_descriptions") or {}
    if labels and len(labels) == num_classes:
        labels = [str(x) for x in labels]
        synsets = labels if all(WORDNET_ID.match(x) for x in labels) else []
        info = _imagenet_info(timm, num_classes) if synsets else None
        names = [descriptions.get(x) or (info.label_name_to_description(x) if info else x) for x in labels]
        return [_first_name(n) for n in names], synsets
    info = _imagenet_info(timm, num_classes)
    if info is None:
        return [], []
    return [_first_name(n) for n in info.label_descriptions()], list(info.label_names())


def _imagenet_info(timm: Any, num_classes: int):
    subset = timm.data.infer_imagenet_subset({"num_classes": num_classes})
    return timm.data.ImageNetInfo(subset) if subset else None


def _first_name(description: str) -> str:
    """'tench, Tinca tinca' -> 'tench' (the common name, as torchvision shows ImageNet classes)."""
    return re.split(r",\s*", str(description))[0]
