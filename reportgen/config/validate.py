"""Checks a composed config before any work: everything the schema cannot know (files exist, names are known,
combinations make sense). Each failure is one ConfigError naming the key, the value and the valid choices."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict

import torch
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from reportgen.config.schema import Device, ModelSource, torchvision_model_names
from reportgen.errors import ConfigError
from reportgen.inputs.shards import runtime_shard

SYNTHETIC_DATASETS = ["shapes"]
IMAGE_FORMATS = ["jpeg", "png", "webp"]


def validate(cfg: DictConfig) -> Dict[str, Any]:
    """Raise ConfigError on the first problem; return each selected analysis's typed, defaulted config."""
    from reportgen.analyses import ANALYSES

    _validate_model(cfg.model)
    _validate_dataset(cfg.dataset)
    runtime = cfg.runtime
    if int(runtime.batch_size) < 1:
        raise ConfigError("runtime.batch_size", runtime.batch_size, "an integer >= 1")
    if int(runtime.num_workers) < 0:
        raise ConfigError("runtime.num_workers", runtime.num_workers, "an integer >= 0")
    if int(runtime.checkpoint_every) < 0:
        raise ConfigError("runtime.checkpoint_every", runtime.checkpoint_every, "an integer >= 0 (0: no checkpoints)")
    runtime_shard(runtime)
    select_device(runtime.device)
    if str(cfg.report.image_format) not in IMAGE_FORMATS:
        raise ConfigError("report.image_format", cfg.report.image_format, "an image format", IMAGE_FORMATS)
    for key in ("thumbnail_size", "figure_dpi"):
        if int(cfg.report[key]) < 1:
            raise ConfigError(f"report.{key}", cfg.report[key], "an integer >= 1")
    if int(cfg.report.gallery_size) < 0:
        raise ConfigError("report.gallery_size", cfg.report.gallery_size, "an integer >= 0")
    if not cfg.analysis:
        raise ConfigError("analysis", [], "at least one analysis, e.g. analysis=[summary,predictions]",
                          sorted(ANALYSES))
    typed: Dict[str, Any] = {}
    for name, node in cfg.analysis.items():
        if name not in ANALYSES:
            raise ConfigError("analysis", name, "a registered analysis", sorted(ANALYSES))
        schema = OmegaConf.structured(ANALYSES[name].Config)
        try:
            typed[name] = OmegaConf.merge(schema, node if node is not None else {})
        except OmegaConfBaseException as exc:
            key = getattr(exc, "key", None)
            choices = sorted(schema.keys())
            raise ConfigError(f"analysis.{name}" + (f".{key}" if key else ""), key,
                              f"a valid option of {name} ({str(exc).splitlines()[0]})", choices) from exc
        ANALYSES[name].check_config(typed[name])
    return typed


def _validate_model(model: DictConfig) -> None:
    from reportgen.inputs.models import resolve_weights

    source = ModelSource(_name(model.source))
    if source is ModelSource.torchvision:
        if model.name not in torchvision_model_names():
            raise ConfigError("model.name", model.name,
                              "a torchvision model (classification, segmentation or detection)",
                              torchvision_model_names())
        resolve_weights(model.name, model.weights)
    elif source is ModelSource.checkpoint:
        if not model.path:
            raise ConfigError("model.path", model.path, "the path of a checkpoint file (state_dict or TorchScript)")
        if not Path(model.path).is_file():
            raise ConfigError("model.path", model.path, "an existing checkpoint file")
        if model.arch is not None and model.arch not in torchvision_model_names():
            raise ConfigError("model.arch", model.arch, "a torchvision architecture", torchvision_model_names())
    elif source is ModelSource.timm:
        from reportgen.inputs.timm_models import check_timm_name

        check_timm_name(model.name)
        _check_library_weights(model, "a .safetensors or .pth state dict file")
        if model.path and not Path(model.path).is_file():
            raise ConfigError("model.path", model.path, "an existing .safetensors or .pth state dict file")
    elif source is ModelSource.hf:
        _check_library_weights(model, "a save_pretrained folder")
        if model.path:
            if not (Path(model.path) / "config.json").is_file():
                raise ConfigError("model.path", model.path, "a save_pretrained folder holding config.json (and "
                                  "model.safetensors, preprocessor_config.json)")
        elif not model.name:
            raise ConfigError("model.name", model.name, "a Hugging Face hub id such as google/vit-base-patch16-224 "
                              "(read from the local cache), or model.path=<a save_pretrained folder>")
    elif source is ModelSource.open_clip:
        from reportgen.inputs.clip_models import check_open_clip_name

        check_open_clip_name(model.name)
        if model.weights is not None and model.weights != "DEFAULT":
            raise ConfigError("model.weights", model.weights, "DEFAULT (the state dict file at model.path) or null "
                              "(random initialisation)", ["DEFAULT", "null"])
        if model.path and not Path(model.path).is_file():
            raise ConfigError("model.path", model.path, "an existing open_clip state dict file (.pt, .pth, .bin or "
                              ".safetensors)")
    else:
        if model.target is None or "_target_" not in model.target:
            raise ConfigError("model.target", None if model.target is None else OmegaConf.to_container(model.target),
                              "a node with _target_: the dotted path of a callable returning an nn.Module")
    if model.labels_file and not Path(model.labels_file).is_file():
        raise ConfigError("model.labels_file", model.labels_file, "an existing .txt or .json file of class names")


def _check_library_weights(model: DictConfig, path_kind: str) -> None:
    """timm and hf take weights DEFAULT (pretrained) or null (random); a file goes to model.path."""
    if model.weights is not None and model.weights != "DEFAULT":
        raise ConfigError("model.weights", model.weights, f"DEFAULT (pretrained, from the local Hugging Face hub "
                          f"cache) or null (random initialisation); {path_kind} goes to model.path",
                          ["DEFAULT", "null"])


def _validate_dataset(dataset: DictConfig) -> None:
    if dataset.root is None:
        if dataset.synthetic not in SYNTHETIC_DATASETS:
            raise ConfigError("dataset.root", None, "a folder of images (or dataset.synthetic for the demo)")
    elif not Path(dataset.root).is_dir():
        raise ConfigError("dataset.root", dataset.root, "an existing folder of images")
    if dataset.synthetic is not None and dataset.synthetic not in SYNTHETIC_DATASETS:
        raise ConfigError("dataset.synthetic", dataset.synthetic, "a built-in demo folder", SYNTHETIC_DATASETS)
    if dataset.limit is not None and int(dataset.limit) < 1:
        raise ConfigError("dataset.limit", dataset.limit, "null or an integer >= 1")
    if not dataset.extensions:
        raise ConfigError("dataset.extensions", [], "at least one file suffix such as .jpg")
    if dataset.masks is not None and not Path(dataset.masks).is_dir():
        raise ConfigError("dataset.masks", dataset.masks, "an existing folder of PNG masks (a/b.png for the image "
                                                          "a/b.jpg), or null")


def resolve_dataset_root(dataset: DictConfig) -> Path:
    """The folder to scan: `root`, or the generated demo folder in the user cache."""
    if dataset.root is not None:
        return Path(dataset.root)
    from reportgen.inputs.demo.shapes import ensure_demo_folder

    return ensure_demo_folder()


def select_device(device: Any) -> torch.device:
    """auto -> cuda when available else cpu; cuda without a GPU is a config error, not a crash mid-run."""
    name = _name(device)
    if name == Device.auto.value:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == Device.cuda.value and not torch.cuda.is_available():
        raise ConfigError("runtime.device", "cuda", "a device this machine has (no CUDA GPU is visible)",
                          ["auto", "cpu"])
    return torch.device(name)


def _name(value: Any) -> str:
    return value.value if hasattr(value, "value") else str(value)
