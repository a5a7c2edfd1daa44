"""The typed config schema: one dataclass per config group, enums for closed choices, a reason on every field.

The dataclasses are the single source of truth for every option and its default; the yaml files under `conf/`
only select and override. Hydra merges every file into these schemas (registered by config/store.py), so a typo'd
key or a wrong type fails at composition; config/validate.py then checks what a schema cannot.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Dict, List, Optional

from omegaconf import DictConfig, OmegaConf


class ModelSource(Enum):
    torchvision = "torchvision"  # an architecture from torchvision.models by name, optional pretrained weights
    checkpoint = "checkpoint"  # a local state_dict for a named architecture, or a TorchScript file
    target = "target"  # any callable returning an nn.Module, given as a Hydra `_target_` node
    timm = "timm"  # a timm architecture by name (pip install 'reportgen[timm]'), weights from the local HF hub cache
    hf = "hf"  # a Hugging Face transformers image model: a save_pretrained folder or a cached hub id ('[hf]')
    open_clip = "open_clip"  # an open_clip CLIP model, used as a zero-shot classifier of the folder's classes ('[clip]')


class ModelTask(Enum):
    auto = "auto"  # decided from what the model's library says, else from the output of a probe forward
    classification = "classification"  # (B, K) class scores (zero-shot CLIP included: its head is text embeddings)
    embedding = "embedding"  # a backbone: (B, D) pooled features (timm num_classes=0, DINOv2, CLIP image towers)
    segmentation = "segmentation"  # (B, K, H, W) per-pixel class logits
    detection = "detection"  # per-image boxes, labels and scores


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
    """How a decoded image becomes the model's input; null fields come from the model's library (torchvision
    weights' metadata, timm's data config, the Hugging Face image processor) or ImageNet's defaults."""

    resize: Optional[int] = None  # shorter side resized to this before the crop (null: the model's, else 256)
    crop: Optional[int] = None  # centre crop size in pixels (null: the model's, else 224)
    mean: Optional[List[float]] = None  # per-channel normalisation mean, RGB order (null: the model's or ImageNet)
    std: Optional[List[float]] = None  # per-channel normalisation std, RGB order (null: the model's or ImageNet)
    interpolation: Optional[str] = None  # resize filter: bilinear | bicubic | nearest | lanczos | box | hamming
    crop_mode: Optional[str] = None  # center (shorter side to resize, crop) | squash (both sides to resize, crop)
    #   | border (longer side to resize, pad to crop) | whole (shorter side to resize, no crop: segmentation);
    #   null: the model's (timm's crop_mode, whole for segmentation models), else center
    size_divisor: Optional[int] = None  # whole: each side rounded to a multiple of this (a U-Net's stride, e.g. 32)
    max_size: Optional[int] = None  # whole: the longer side at most this (DETR's longest_edge 1333); 0: no cap
    channels: Optional[int] = None  # 1 (grayscale decode) or 3 (RGB); null: the model's first conv's in_channels


@dataclass
class ModelConfig:
    """Which network to load and how; see reportgen/inputs/models.py for the sources."""

    source: ModelSource = ModelSource.torchvision  # where the model comes from
    task: ModelTask = ModelTask.auto  # what the model's output is; auto: from its library, else from a probe forward
    name: Optional[str] = None  # torchvision architecture (e.g. resnet18), timm model name (vit_small_patch16_224,
    #   or name.tag), or Hugging Face hub id (google/vit-base-patch16-224, read from the local cache)
    weights: Optional[str] = "DEFAULT"  # null (random init) | DEFAULT | a torchvision enum name such as IMAGENET1K_V2
    arch: Optional[str] = None  # torchvision architecture the checkpoint's state_dict belongs to
    path: Optional[str] = None  # checkpoint: a state_dict (.pt/.pth) or TorchScript file; timm: a .safetensors or
    #   .pth state dict (instead of the pretrained weights); hf: a save_pretrained folder (instead of model.name)
    target: Optional[Any] = None  # source=target: {_target_: pkg.module.fn, ...kwargs} returning an nn.Module
    kwargs: Dict[str, Any] = field(default_factory=dict)  # extra builder arguments, e.g. {num_classes: 10}
    labels_file: Optional[str] = None  # class names: a .txt (one per line) or .json list; overrides weights' meta
    class_names: Optional[List[str]] = None  # zero-shot CLIP: the classes to score (null: the folder's class names,
    #   WordNet-id folders through their synset names; or model.labels_file)
    prompts: Any = field(default_factory=lambda: ["a photo of a {}."])  # zero-shot CLIP: prompt templates with {} for
    #   the class name (a list), or the string "imagenet" for the CLIP paper's 80 ImageNet templates
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
    # seconds one file may take to decode and crop before it is listed as failed (0: no limit); a decoder stuck in
    # native code is stopped with its worker process (runtime.num_workers > 0 only)
    decode_timeout: float = 30.0
    masks: Optional[str] = None  # segmentation ground truth: a folder of PNG masks, `a/b.png` for image `a/b.jpg`
    #   (index or palette PNGs: the pixel value or palette index is the class)
    ignore_index: int = 255  # mask value of pixels that are not scored (borders, void)
    mask_mapping: Optional[Dict[int, int]] = None  # mask value -> model class index (e.g. Cityscapes ids -> train
    #   ids); values not in the mapping become ignore_index. null: mask values are the model's class indices
    annotations: Optional[str] = None  # detection ground truth: a COCO instances .json file, a YOLO labels folder
    #   (<stem>.txt with data.yaml or classes.txt beside it) or a Pascal VOC Annotations folder (<stem>.xml)


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


def torchvision_model_names() -> List[str]:
    """Every classification, semantic segmentation and detection architecture torchvision can build by name."""
    return sorted(name for names in _torchvision_names_by_task().values() for name in names)


def torchvision_task(name: str) -> str:
    """The task of a torchvision architecture, from the module that builds it: `models.segmentation` ->
    segmentation, `models.detection` -> detection, `models` -> classification."""
    for task, names in _torchvision_names_by_task().items():
        if name in names:
            return task
    raise KeyError(name)


def _torchvision_names_by_task() -> Dict[str, List[str]]:
    import torchvision

    models = torchvision.models
    return {"classification": models.list_models(module=models),
            "segmentation": models.list_models(module=models.segmentation),
            "detection": models.list_models(module=models.detection)}


def to_container(cfg: DictConfig) -> Dict[str, Any]:
    """Plain, resolved dict of a config (enums as their names) for manifests and reports."""
    return OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)  # type: ignore[return-value]
