"""Load the network to report on, from one of three sources, with its preprocessing and class names.

- torchvision: any architecture of `torchvision.models` by name; weights null | DEFAULT | an enum member name,
  read from the torch hub cache (`$TORCH_HOME/hub/checkpoints`), downloaded only where a network allows.
- checkpoint: a local state_dict for a named torchvision architecture, or a TorchScript archive. Loaded with
  `weights_only=True`, so a pickle cannot run code unless the user opts in with `model.trust_checkpoint=true`.
- target: any callable named by a Hydra `_target_` node that returns an `nn.Module`.
- timm / hf: timm architectures and Hugging Face transformers classifiers, in their own modules (timm_models.py,
  hf_models.py), imported only when chosen: both libraries are optional extras.

Every source's input channel count is read from the model (its first convolution or patch embedding) unless
`model.preprocess.channels` says otherwise; a 1-channel model gets grayscale images.
"""
from __future__ import annotations

import dataclasses
import logging
import zipfile
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torchvision
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from reportgen.config.schema import ModelSource, torchvision_model_names, torchvision_task
from reportgen.errors import ConfigError, ModelLoadError
from reportgen.inputs.labels import WORDNET_ID, imagenet_synsets, read_labels_file
from reportgen.inputs.loaded_model import LoadedModel, first_input_channels
from reportgen.inputs.preprocess import Preprocess
from reportgen.inputs.state_dicts import check_fits, mismatched_keys, read_state_dict
from reportgen.inputs.tasks import identity_head_task

log = logging.getLogger(__name__)
__all__ = ["LoadedModel", "load_model"]


def load_model(cfg: DictConfig, folder_classes: Sequence[str] = ()) -> LoadedModel:
    """Build the model described by the `model` config node, in eval mode, on the CPU. `folder_classes` (the
    dataset's class folders) are what a zero-shot CLIP model classifies unless the config names the classes."""
    source = ModelSource(cfg.source) if not isinstance(cfg.source, ModelSource) else cfg.source
    if source is ModelSource.torchvision:
        loaded = _load_torchvision(cfg)
    elif source is ModelSource.checkpoint:
        loaded = _load_checkpoint(cfg)
    elif source is ModelSource.timm:
        from reportgen.inputs.timm_models import load_timm

        loaded = load_timm(cfg)
    elif source is ModelSource.hf:
        from reportgen.inputs.hf_models import load_hf, locate_hf

        kind, folder, label, weights_file = locate_hf(cfg)
        if kind == "zero_shot":  # CLIPModel, SiglipModel: a zero-shot classifier of the folder's classes
            from reportgen.inputs.clip_models import load_hf_zero_shot

            loaded = load_hf_zero_shot(cfg, folder, label, weights_file, folder_classes)
        else:
            loaded = load_hf(cfg)
    elif source is ModelSource.open_clip:
        from reportgen.inputs.clip_models import load_open_clip

        loaded = load_open_clip(cfg, folder_classes)
    else:
        loaded = _load_target(cfg)
    if cfg.labels_file and not loaded.zero_shot:  # zero-shot CLIP reads it as its class list
        loaded.class_names = read_labels_file(Path(cfg.labels_file))
        loaded.synsets = list(loaded.class_names) if all(WORDNET_ID.match(n) for n in loaded.class_names) else []
    if not loaded.synsets and len(loaded.class_names) == 1000 and not loaded.zero_shot:
        loaded.synsets = imagenet_synsets()  # a 1000-class ImageNet head: outputs in sorted-synset order
    loaded.synsets = list(getattr(loaded.module, "synsets", None) or loaded.synsets)  # a model may declare its own
    loaded.module.eval()
    return loaded


def model_preprocess(cfg: DictConfig, module: torch.nn.Module, base: Optional[Preprocess] = None,
                     source: str = "ImageNet defaults") -> Preprocess:
    """`base` (the library's numbers, else ImageNet's) with the model's input channel count (first conv), then the
    config's `model.preprocess` values on top; mean/std are checked against the channel count."""
    base = base or Preprocess()
    channels = first_input_channels(module)
    if channels is not None and channels != base.channels:
        base = dataclasses.replace(base, channels=channels)
    return Preprocess.resolve(cfg.preprocess, base, source=source)


def weights_enum(arch: str):
    """torchvision's weights enum for an architecture (ConfigError with close matches for an unknown name)."""
    names = torchvision_model_names()
    if arch not in names:
        raise ConfigError("model.name", arch, "a torchvision model (classification, segmentation or detection)", names)
    return torchvision.models.get_model_weights(arch)


def resolve_weights(arch: str, weights: Optional[str]):
    """null -> None; DEFAULT or a member name -> the enum member; anything else -> ConfigError."""
    if weights is None:
        return None
    enum = weights_enum(arch)
    members = ["DEFAULT"] + [m.name for m in enum]
    if weights == "DEFAULT":
        return enum.DEFAULT
    if weights not in members:
        raise ConfigError("model.weights", weights, f"null or a weights name of {arch}", members)
    return enum[weights]


def hub_checkpoint_path(url: str) -> Path:
    """Where torch.hub caches (and looks for) the file of a weights URL."""
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(url).name


def _load_torchvision(cfg: DictConfig) -> LoadedModel:
    arch = cfg.name
    if not arch:
        raise ConfigError("model.name", arch, "a torchvision architecture name", torchvision_model_names())
    weights = resolve_weights(arch, cfg.weights)
    kwargs = dict(OmegaConf.to_container(cfg.kwargs, resolve=True)) if cfg.kwargs else {}
    meta_weights = weights if weights is not None else weights_enum(arch).DEFAULT
    if weights is not None:
        _ensure_cached(weights, arch)
    builder = torchvision.models.get_model_builder(arch)
    kwargs = offline_backbone(arch, weights, kwargs)
    try:
        module = builder(weights=weights, **kwargs)
    except (TypeError, ValueError) as exc:  # unknown kwarg, or num_classes that contradicts pretrained weights
        raise ModelLoadError(f"torchvision.models.{arch}(weights={cfg.weights}, **{kwargs}) failed: {exc} "
                             f"(check model.kwargs)") from exc
    except (OSError, RuntimeError) as exc:
        raise ModelLoadError(_offline_message(weights, arch, exc)) from exc
    class_names = _class_names(module, _categories_if_same_head(meta_weights, kwargs.get("num_classes")))
    preprocess = model_preprocess(cfg, module, torchvision_preprocess(arch, module, meta_weights),
                                  source="the torchvision weights' metadata")
    task, reason = torchvision_task_of(arch, module)
    return LoadedModel(task=task, task_reason=reason,
        module=module,
        name=arch,
        source="torchvision",
        library="torchvision",
        weights=f"{type(weights).__name__}.{weights.name}" if weights is not None else "random initialisation",
        weights_file=str(hub_checkpoint_path(weights.url)) if weights is not None else None,
        random_init=weights is None,
        preprocess=preprocess,
        class_names=class_names,
    )


def offline_backbone(arch: str, weights: Any, kwargs: Dict[str, Any]) -> Dict[str, Any]:
    """Segmentation and detection builders fetch ImageNet backbone weights unless told not to: with random weights
    (or a checkpoint to load) no backbone file is wanted, so `weights_backbone=None` unless the config sets it."""
    if torchvision_task(arch) != "classification" and weights is None and "weights_backbone" not in kwargs:
        return dict(kwargs, weights_backbone=None)
    return kwargs


def torchvision_preprocess(arch: str, module: torch.nn.Module, weights: Any) -> Preprocess:
    """The input recipe of a torchvision architecture. Classifiers: the weights' transforms (resize, centre crop).
    Segmentation: the weights' transforms (shorter side 520, no crop: the whole image). Detection: the model
    normalises and resizes inside (GeneralizedRCNNTransform), so images go in as decoded, in [0, 1] (mean 0, std 1);
    its min_size sizes only the blank probe."""
    task = torchvision_task(arch)
    transform = weights.transforms()
    if task == "classification":
        return Preprocess.from_torchvision(transform)
    if task == "segmentation":
        return Preprocess.from_torchvision_segmentation(transform)
    min_size = getattr(getattr(module, "transform", None), "min_size", (800,))
    side = int(min_size[0] if isinstance(min_size, (list, tuple)) else min_size)
    return Preprocess(resize=side, crop=side, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), crop_mode="none")


def torchvision_task_of(arch: str, module: torch.nn.Module) -> Tuple[Optional[str], str]:
    """(task, reason) of a torchvision model: its builder's module says segmentation or detection; a classifier
    whose head was replaced by nn.Identity is a backbone (embedding)."""
    task = torchvision_task(arch)
    if task != "classification":
        return task, f"torchvision builds {arch} in torchvision.models.{task}"
    backbone = identity_head_task(module)
    return backbone if backbone[0] else ("classification", f"torchvision builds {arch} in torchvision.models "
                                                           f"(a classifier)")


def _ensure_cached(weights: Any, arch: str) -> None:
    """Use the hub cache when the file is there; otherwise try torch.hub's download and explain a failure."""
    path = hub_checkpoint_path(weights.url)
    if path.is_file():
        return
    log.info("weights %s not in the hub cache (%s); trying to download", weights.name, path)
    try:
        torch.hub.load_state_dict_from_url(weights.url, progress=False, check_hash=True)
    except Exception as exc:  # URLError, HTTPError, timeouts, hash mismatch: all mean "no usable file"
        raise ModelLoadError(_offline_message(weights, arch, exc)) from exc


def _offline_message(weights: Any, arch: str, exc: BaseException) -> str:
    path = hub_checkpoint_path(weights.url)
    return (
        f"pretrained weights {type(weights).__name__}.{weights.name} for '{arch}' are not in the torch hub cache "
        f"and could not be downloaded ({type(exc).__name__}: {exc}).\n"
        f"  Either put the file '{path.name}' (from {weights.url}) at:\n    {path}\n"
        f"  (the cache folder is $TORCH_HOME/hub/checkpoints; TORCH_HOME defaults to ~/.cache/torch),\n"
        f"  or run with random weights: model.weights=null"
    )


def _load_checkpoint(cfg: DictConfig) -> LoadedModel:
    if not cfg.path:
        raise ConfigError("model.path", cfg.path, "the path of a checkpoint file (state_dict or TorchScript)")
    path = Path(cfg.path)
    if not path.is_file():
        raise ConfigError("model.path", str(path), "an existing checkpoint file")
    if is_torchscript(path):
        module = torch.jit.load(str(path), map_location="cpu")
        name = cfg.arch or path.stem
        return LoadedModel(module=module, name=name, source="checkpoint", weights=f"TorchScript {path.name}",
                           weights_file=str(path), random_init=False,
                           preprocess=model_preprocess(cfg, module),
                           class_names=_class_names(module, None))
    if not cfg.arch:
        raise ConfigError("model.arch", None, "the torchvision architecture of this state_dict",
                          torchvision_model_names())
    weights_enum(cfg.arch)  # validates the name
    state = read_state_dict(path, trust=cfg.trust_checkpoint)
    kwargs = dict(OmegaConf.to_container(cfg.kwargs, resolve=True)) if cfg.kwargs else {}
    module, notes, num_classes = _build_and_load(cfg.arch, state, kwargs, path)
    default_weights = weights_enum(cfg.arch).DEFAULT
    preprocess = model_preprocess(cfg, module, torchvision_preprocess(cfg.arch, module, default_weights),
                                  source="the torchvision weights' metadata")
    task, reason = torchvision_task_of(cfg.arch, module)
    return LoadedModel(module=module, name=cfg.arch, source="checkpoint", library="torchvision",
                       task=task, task_reason=reason,
                       weights=f"checkpoint {path.name}", weights_file=str(path), random_init=False,
                       preprocess=preprocess,
                       class_names=_class_names(module, _categories_if_same_head(default_weights, num_classes)),
                       notes=notes)


def is_torchscript(path: Path) -> bool:
    """TorchScript archives are zip files with a `<name>/code/` folder; torch.save files have none."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any("/code/" in name for name in archive.namelist())


def _build_and_load(arch: str, state: Dict[str, torch.Tensor], kwargs: Dict[str, Any], path: Path):
    """Build `arch` and load `state` strictly. When only the classifier's output size differs and
    num_classes was not given, rebuild with the checkpoint's num_classes (and say so)."""
    builder = torchvision.models.get_model_builder(arch)
    kwargs = offline_backbone(arch, None, kwargs)
    module = builder(weights=None, **kwargs)
    notes: List[str] = []
    expected = module.state_dict()
    mismatched = mismatched_keys(state, expected)
    head = None
    if mismatched and "num_classes" not in kwargs:
        head = _classifier_out_features(state, mismatched, expected)
        if head is not None:
            module = builder(weights=None, num_classes=head, **kwargs)
            notes.append(f"num_classes={head} inferred from the checkpoint's classifier")
    check_fits(state, module.state_dict(), path, arch,
               "check model.arch (and model.kwargs, e.g. num_classes) against how the checkpoint was made")
    module.load_state_dict(state, strict=True)
    return module, notes, kwargs.get("num_classes", head if notes else None)


def _classifier_out_features(state, mismatched, expected) -> Optional[int]:
    """num_classes of the checkpoint when the mismatch is exactly the last layer's weight (and bias), or, for a
    segmentation head (convolutions: LR-ASPP's two classifiers, DeepLabV3's last conv), when every mismatched tensor
    differs only in its output size and all by the same number."""
    last_weight = [k for k in expected if k.endswith("weight") and expected[k].dim() == 2][-1:]
    if last_weight:
        head = last_weight[0]
        allowed = {head, head[: -len("weight")] + "bias"}
        if set(mismatched) <= allowed and head in mismatched and state[head].shape[1:] == expected[head].shape[1:]:
            return int(state[head].shape[0])
    present = [k for k in mismatched if k in state and k in expected]
    if present and len(present) == len(mismatched) and any(expected[k].dim() == 4 for k in present) and all(
            state[k].dim() == expected[k].dim() and state[k].shape[1:] == expected[k].shape[1:] for k in present):
        sizes = {int(state[k].shape[0]) for k in present}
        if len(sizes) == 1:
            return sizes.pop()
    return None


def _load_target(cfg: DictConfig) -> LoadedModel:
    if cfg.target is None or "_target_" not in cfg.target:
        raise ConfigError("model.target", None if cfg.target is None else dict(cfg.target),
                          "a node with _target_: the dotted path of a callable returning an nn.Module")
    target_name = str(cfg.target["_target_"])
    try:
        module = instantiate(cfg.target)
    except Exception as exc:
        raise ModelLoadError(f"model.target {target_name} failed: {type(exc).__name__}: {exc}") from exc
    if not isinstance(module, torch.nn.Module):
        raise ModelLoadError(f"model.target {target_name} returned {type(module).__name__}, not an nn.Module")
    random_init = bool(getattr(module, "random_init", False))
    return LoadedModel(module=module, name=type(module).__name__, source="target", weights=target_name,
                       random_init=random_init,  # the task: from the probe forward (tasks.decide_task)
                       preprocess=model_preprocess(cfg, module),
                       class_names=_class_names(module, None))


def _categories_if_same_head(weights: Any, num_classes: Optional[int]) -> Optional[List[str]]:
    """The weights' category names, unless the model was built with a different number of outputs (a fine-tuned
    head's outputs are not ImageNet's classes, so naming them 'tench', 'goldfish', ... would be wrong)."""
    categories = weights.meta.get("categories")
    if categories is None or (num_classes is not None and int(num_classes) != len(categories)):
        return None
    return categories


def _class_names(module: torch.nn.Module, categories: Optional[List[str]]) -> List[str]:
    """Names for the model's outputs: a `class_names` attribute, the weights' categories, or "class i"."""
    names = getattr(module, "class_names", None) or categories
    return list(names) if names else []
