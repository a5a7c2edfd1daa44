"""Typed config schema, its registration in Hydra's ConfigStore, and validation with errors people can act on.

The dataclasses are the single source of truth for every option and its default; the yaml files under `conf/`
only select and override. Hydra merges every file into these schemas, so a typo'd key or a wrong type fails at
composition. `validate()` then checks what a schema cannot (files exist, names are known) before any work starts.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass, field, fields, is_dataclass
from enum import Enum
from pathlib import Path
from typing import Any, Dict, List, Optional, get_type_hints

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf


class ConfigError(ValueError):
    """A config value that cannot work; the message names the key, the value and what would."""

    def __init__(self, key: str, value: Any, expected: str, choices: Optional[List[str]] = None):
        message = f"config key '{key}': got {value!r}; expected {expected}."
        if choices:
            close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=3, cutoff=0.6)
            if close:
                message += f" Did you mean {' or '.join(repr(c) for c in close)}?"
            shown = ", ".join(str(c) for c in choices[:40])
            more = f" ... ({len(choices)} in all)" if len(choices) > 40 else ""
            message += f"\n  valid choices: {shown}{more}"
        super().__init__(message)
        self.key = key


class ModelSource(Enum):
    torchvision = "torchvision"  # an architecture from torchvision.models by name, optional pretrained weights
    checkpoint = "checkpoint"  # a local state_dict for a named architecture, or a TorchScript file
    target = "target"  # any callable returning an nn.Module, given as a Hydra `_target_` node


class Device(Enum):
    auto = "auto"  # cuda when available, else cpu
    cpu = "cpu"
    cuda = "cuda"


class Precision(Enum):
    fp32 = "fp32"
    bf16 = "bf16"  # autocast; activations and statistics still reduced in fp32
    fp16 = "fp16"


class LabelMode(Enum):
    auto = "auto"  # first-level subfolders are classes when any image lies in one
    folders = "folders"  # same, but an error if there are no class folders
    none = "none"  # ignore folder names; no accuracy


@dataclass
class PreprocessConfig:
    """How a decoded image becomes the model's input; null fields come from the weights' metadata or ImageNet."""

    resize: Optional[int] = None  # shorter side resized to this before the crop (null: weights' value, else 256)
    crop: Optional[int] = None  # centre crop size in pixels (null: weights' value, else 224)
    mean: Optional[List[float]] = None  # per-channel normalisation mean, RGB order (null: weights' or ImageNet)
    std: Optional[List[float]] = None  # per-channel normalisation std, RGB order (null: weights' or ImageNet)
    interpolation: Optional[str] = None  # resize filter: bilinear | bicubic | nearest (null: weights' or bilinear)


@dataclass
class ModelConfig:
    """Which network to load and how; see reportgen/models.py for the three sources."""

    source: ModelSource = ModelSource.torchvision  # where the model comes from
    name: Optional[str] = None  # torchvision architecture (source=torchvision), e.g. resnet18
    weights: Optional[str] = "DEFAULT"  # null (random init) | DEFAULT | an enum name such as IMAGENET1K_V2
    arch: Optional[str] = None  # torchvision architecture the checkpoint's state_dict belongs to
    path: Optional[str] = None  # checkpoint file: a state_dict (.pt/.pth) or a TorchScript archive
    target: Optional[Any] = None  # source=target: {_target_: pkg.module.fn, ...kwargs} returning an nn.Module
    kwargs: Dict[str, Any] = field(default_factory=dict)  # extra builder arguments, e.g. {num_classes: 10}
    labels_file: Optional[str] = None  # class names: a .txt (one per line) or .json list; overrides weights' meta
    trust_checkpoint: bool = False  # allow full pickles (runs code from the file!); default weights_only loading
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)


@dataclass
class DatasetConfig:
    """The image folder the pass runs over."""

    root: Optional[str] = None  # folder scanned recursively; relative paths are from the working directory
    synthetic: Optional[str] = None  # 'shapes': when root is null, generate the demo folder into the user cache
    extensions: List[str] = field(
        default_factory=lambda: [".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"]
    )  # file suffixes scanned, case-insensitive
    labels: LabelMode = LabelMode.auto  # class labels from first-level subfolders
    limit: Optional[int] = None  # process only the first N files of the sorted list
    max_pixels: int = 89_478_485  # larger images are refused as decompression bombs (PIL's default limit)


@dataclass
class ReportConfig:
    """What the HTML report shows and how large it may get."""

    title: Optional[str] = None  # page title (null: model name and dataset folder)
    thumbnail_size: int = 128  # longest side of gallery thumbnails, pixels
    gallery_size: int = 48  # images per gallery (bounded so reports stay small)
    image_format: str = "jpeg"  # thumbnails: jpeg | png | webp
    figure_dpi: int = 110  # resolution of matplotlib figures
    single_file: bool = False  # also write <run>/report.html with every image inlined (for mail; warns > 50 MB)


@dataclass
class RuntimeConfig:
    """Where and how the pass runs."""

    device: Device = Device.auto  # auto | cpu | cuda
    precision: Precision = Precision.fp32  # fp32 | bf16 | fp16 (autocast)
    batch_size: int = 32  # images per forward pass
    num_workers: int = 2  # DataLoader decode processes (0: decode in the main process)
    channels_last: bool = False  # NHWC memory format for convolutions (faster on recent GPUs)
    seed: int = 0  # seeds torch/numpy/random for anything stochastic (e.g. random-init weights)
    progress: bool = True  # tqdm progress bar with images/s
    strict: bool = False  # stop at the first unreadable file instead of listing it and going on
    shard: Optional[str] = None  # "i/n": only the i-th of n equal slices of the sorted file list; writes the
    #   mergeable state (results/state.pt) for `python -m reportgen.merge`, no report. "i" alone with num_shards
    num_shards: Optional[int] = None  # n for a bare "i", so a sweep can say: runtime.num_shards=8 'runtime.shard=range(0,8)'
    resume: bool = True  # a run folder holding an interrupted run of this config continues where it stopped
    #   (false: start over, discarding it)
    checkpoint_every: int = 50  # batches between saves of the mergeable state (0: never; a crash restarts)


@dataclass
class Config:
    """The whole run. `analysis` maps analysis name -> that analysis's own config dataclass."""

    model: ModelConfig = field(default_factory=ModelConfig)
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    analysis: Dict[str, Any] = field(default_factory=dict)
    report: ReportConfig = field(default_factory=ReportConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)


CONFIG_GROUPS = ("model", "dataset", "analysis", "report", "runtime", "experiment")
_REGISTERED = False


def torchvision_model_names() -> List[str]:
    """Every classification architecture torchvision can build by name."""
    import torchvision

    return sorted(torchvision.models.list_models(module=torchvision.models))


def register_configs() -> None:
    """Store the schema, one `model/<name>` option per torchvision architecture, and one `analysis/<name>` per
    registered analysis (typed by its Config dataclass, placed at `analysis.<name>`)."""
    global _REGISTERED
    if _REGISTERED:
        return
    from reportgen.analyses import ANALYSES

    cs = ConfigStore.instance()
    cs.store(name="base_config", node=Config)
    for name in torchvision_model_names():
        cs.store(group="model", name=name, node=ModelConfig(source=ModelSource.torchvision, name=name))
    for name, analysis_cls in ANALYSES.items():
        cs.store(group="analysis", name=name, node=analysis_cls.Config(), package=f"analysis.{name}")
    _REGISTERED = True


def conf_dir() -> Path:
    """The project's `conf/` folder (run.py and tests compose from it)."""
    return Path(__file__).resolve().parent.parent / "conf"


def group_options(group: str) -> List[str]:
    """Names selectable for a config group: yaml files in conf/<group>/ plus ConfigStore entries."""
    register_configs()
    names = {p.stem for p in (conf_dir() / group).glob("*.yaml")}
    repo = ConfigStore.instance().repo.get(group, {})
    names.update(k[: -len(".yaml")] for k in repo if k.endswith(".yaml"))
    return sorted(names)


def schema_for(path: List[str]) -> Any:
    """The dataclass (or None for free-form nodes) that holds the config key at `path`, e.g. ['runtime']."""
    from reportgen.analyses import ANALYSES

    node: Any = Config
    for i, part in enumerate(path):
        if node is None:
            return None
        if node is Config and part == "analysis":
            if i + 1 < len(path):
                analysis_cls = ANALYSES.get(path[i + 1])
                if analysis_cls is None:
                    raise ConfigError("analysis", path[i + 1], "a registered analysis", sorted(ANALYSES))
                return schema_for_fields(analysis_cls.Config, path[i + 2 :])
            return None
        node = _field_type(node, part, ".".join(path[: i + 1]))
    return node


def schema_for_fields(node: Any, path: List[str]) -> Any:
    for i, part in enumerate(path):
        if node is None:
            return None
        node = _field_type(node, part, ".".join(path[: i + 1]))
    return node


def _field_type(node: Any, name: str, full_key: str) -> Any:
    """The type of field `name` of dataclass `node` if it is itself a dataclass, None for leaf/free-form fields;
    ConfigError listing the valid keys when the field does not exist."""
    if not is_dataclass(node):
        return None
    hints = get_type_hints(node)
    if name not in hints:
        raise ConfigError(full_key, name, f"a key of {node.__name__}", sorted(f.name for f in fields(node)))
    return hints[name] if is_dataclass(hints[name]) else None


def check_cli_overrides(overrides: List[str]) -> None:
    """Fail before Hydra starts when an override names an unknown group option or key, with close matches.

    Hydra's own messages list options but do not suggest; this also catches keys of analyses. `+key` (append)
    and `hydra.*` overrides are left to Hydra.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(overrides=overrides)
    for override in parsed:
        key = override.key_or_group
        if override.is_add() or override.is_delete() or key.startswith("hydra") or override.package:
            continue
        parts = key.split(".")
        if len(parts) == 1 and parts[0] in CONFIG_GROUPS:
            choices = group_options(parts[0])
            for value in _override_values(override):
                if value is not None and value not in choices:
                    raise ConfigError(key, value, f"a config in group '{key}'", choices)
            continue
        if parts[0] == "model" and len(parts) > 2 and parts[1] in ("target", "kwargs"):
            continue  # free-form: builder arguments
        parent = schema_for(parts[:-1])
        if parent is not None:
            _field_type(parent, parts[-1], key)


def _override_values(override: Any) -> List[Any]:
    """Plain values of an override: one, a list (`analysis=[a,b]`) or a sweep (`model=a,b`)."""
    if override.is_sweep_override():
        values = list(override.sweep_string_iterator())
    else:
        values = [override.value()]
    flat: List[Any] = []
    for value in values:
        if isinstance(value, (list, tuple)):
            flat.extend(value)
        elif isinstance(value, str) and value.startswith("[") and value.endswith("]"):
            flat.extend(v.strip() for v in value[1:-1].split(",") if v.strip())
        else:
            flat.append(value)
    return flat


def config_from_container(container: Dict[str, Any]) -> DictConfig:
    """The typed config again from a manifest's or state's plain dict (e.g. to merge shards of a finished run)."""
    from reportgen.analyses import get_analysis

    register_configs()
    plain = {k: v for k, v in container.items() if k != "analysis"}
    cfg = OmegaConf.merge(OmegaConf.structured(Config), plain)
    for name, options in (container.get("analysis") or {}).items():
        cfg.analysis[name] = OmegaConf.merge(OmegaConf.structured(get_analysis(name).Config), options or {})
    return cfg  # type: ignore[return-value]


def to_container(cfg: DictConfig) -> Dict[str, Any]:
    """Plain, resolved dict of a config (enums as their names) for manifests and reports."""
    return OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)  # type: ignore[return-value]
