"""Zero-shot CLIP: an image-text model used as a classifier of named classes, as the CLIP paper evaluates it.

Two sources build one: `model=open_clip` (open_clip's own factory and tokenizer, which ship offline; weights from the
state dict file at `model.path`) and `model=hf model.path=<folder>` for a transformers `CLIPModel` / `SiglipModel`
save_pretrained folder (its tokenizer files in the folder). The classes come from `model.class_names`, else
`model.labels_file`, else the dataset's class folders (WordNet-id folders through their synset names); the prompts from
`model.prompts` (templates with `{}`; "imagenet": the 80 templates of the CLIP paper as open_clip ships them).

The class embeddings are made once, at load, as open_clip's `build_zero_shot_classifier` makes them: each prompt's
text embedding normalised, averaged per class, normalised again, giving a (D, K) classifier. The module the report
runs keeps only the image tower (so hooks, Grad-CAM, attention and activations reach its layers) and scores the
normalised image embedding against that classifier: logits = the model's logit scale x cosine (+ SigLIP's bias).
"""
from __future__ import annotations

import abc
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, ListConfig, OmegaConf

from reportgen.errors import ConfigError, ModelLoadError
from reportgen.inputs.hf_models import architecture_class, build_eager, processor_preprocess
from reportgen.inputs.hub_cache import require
from reportgen.inputs.labels import WORDNET_ID, imagenet_1k, read_labels_file
from reportgen.inputs.loaded_model import LoadedModel
from reportgen.inputs.preprocess import INTERPOLATIONS, Preprocess

DEFAULT_PROMPTS = ["a photo of a {}."]
IMAGENET_PROMPTS = "imagenet"  # model.prompts value for the CLIP paper's 80 ImageNet templates
CLASSES_PER_BATCH = 10  # classes whose prompts go through the text tower together (as open_clip batches them)
SIGLIP_NOTE = ("SigLIP was trained with a sigmoid per class (probability = sigmoid(logit)); the report applies its "
               "usual softmax over the classes to these logits. The top-1 class is the same either way")
# open_clip's resize_mode -> Preprocess.crop_mode
OPEN_CLIP_RESIZE = {"shortest": "center", "squash": "squash", "longest": "border"}


class ZeroShotClassifier(torch.nn.Module, abc.ABC):
    """(B, C, H, W) normalised images -> (B, K) logits = scale x cosine(image embedding, class embedding) (+ bias).

    Subclasses hold the image tower as submodules and define `image_features`; the (D, K) text classifier, the logit
    scale (already exponentiated) and SigLIP's bias are buffers, computed once at load without gradients."""

    def __init__(self, classifier: torch.Tensor, scale: torch.Tensor, bias: Optional[torch.Tensor] = None):
        super().__init__()
        self.register_buffer("classifier", classifier.detach().float().clone())  # (D, K)
        self.register_buffer("scale", scale.detach().float().reshape(()).clone())  # () = exp(logit_scale)
        self.register_buffer("bias", None if bias is None else bias.detach().float().reshape(()).clone())  # ()

    @abc.abstractmethod
    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) normalised images -> (B, D) image embeddings, before normalising (the library's own tower)."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        features = self.image_features(images).float()  # (B, D); the tower may run in bf16/fp16 under autocast
        with torch.autocast(features.device.type, enabled=False):  # scale x cosine (~25-100) in fp32: in bf16 its
            features = F.normalize(features, dim=-1)  # rounding (~0.25) ties and swaps close classes
            logits = self.scale * (features @ self.classifier)  # (B, K)
            return logits + self.bias if self.bias is not None else logits


class OpenClipZeroShot(ZeroShotClassifier):
    """open_clip's image tower (`visual`, as the CLIP model names it) against the text classifier."""

    def __init__(self, visual: torch.nn.Module, classifier: torch.Tensor, scale: torch.Tensor,
                 bias: Optional[torch.Tensor] = None):
        super().__init__(classifier, scale, bias)
        self.visual = visual

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        features = self.visual(images)  # (B, D), what open_clip's encode_image returns before normalising
        return features[0] if isinstance(features, tuple) else features  # CoCa's tower also returns its tokens


class HFZeroShot(ZeroShotClassifier):
    """A transformers image tower (`vision_model`, plus CLIP's `visual_projection`; SigLIP pools with its own head and
    has no projection) against the text classifier: what `get_image_features` computes."""

    def __init__(self, vision_model: torch.nn.Module, visual_projection: Optional[torch.nn.Module],
                 classifier: torch.Tensor, scale: torch.Tensor, bias: Optional[torch.Tensor] = None):
        super().__init__(classifier, scale, bias)
        self.vision_model = vision_model
        self.visual_projection = visual_projection

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        pooled = self.vision_model(pixel_values=images).pooler_output  # (B, width)
        return self.visual_projection(pooled) if self.visual_projection is not None else pooled  # (B, D)


# ---- classes and prompts -------------------------------------------------------------------------------------------

def zero_shot_classes(cfg: DictConfig, folder_classes: Sequence[str]) -> Tuple[List[str], List[str], str]:
    """(class names, WordNet id per class or [], where they came from): model.class_names, else model.labels_file,
    else the folder names (WordNet-id folders through their synset names)."""
    if cfg.get("class_names"):
        names = [str(n) for n in cfg.class_names]
        _check_names("model.class_names", names)
        return names, [], "model.class_names"
    if cfg.get("labels_file"):
        names = read_labels_file(Path(cfg.labels_file))
        _check_names("model.labels_file", names)
        return names, [], "model.labels_file"
    folders = [str(c) for c in folder_classes]
    if not folders:
        raise ConfigError("model.class_names", None, "the class names to score: model.class_names, "
                          "model.labels_file or class subfolders in dataset.root")
    if not any(WORDNET_ID.match(c) for c in folders):
        return [c.replace("_", " ") for c in folders], [], "folder names"
    known = synset_names()
    unknown = [c for c in folders if WORDNET_ID.match(c) and c not in known]
    if unknown:
        raise ConfigError("model.class_names", None, f"class names for the WordNet-id folders {unknown[:5]}, which "
                          f"are not ImageNet-1k synsets: set model.class_names or model.labels_file")
    names = [known[c] if WORDNET_ID.match(c) else c.replace("_", " ") for c in folders]
    return names, [c if WORDNET_ID.match(c) else "" for c in folders], "folder WordNet ids"


def synset_names() -> Dict[str, str]:
    """WordNet id -> class name of the 1,000 ImageNet-1k synsets: open_clip's curated CLIP names (IMAGENET_CLASSNAMES,
    in the same sorted-synset order) when open_clip is installed, else the first lemma of the shipped synset list."""
    rows = imagenet_1k()
    try:
        from open_clip import IMAGENET_CLASSNAMES
    except ImportError:
        IMAGENET_CLASSNAMES = None
    if IMAGENET_CLASSNAMES is not None and len(IMAGENET_CLASSNAMES) == len(rows):
        return {wnid: str(name) for (wnid, _), name in zip(rows, IMAGENET_CLASSNAMES)}
    return {wnid: lemmas.split(",")[0].strip() for wnid, lemmas in rows}


def _check_names(key: str, names: List[str]) -> None:
    if not names or any(not n.strip() for n in names):
        raise ConfigError(key, names, "a non-empty list of non-empty class names")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ConfigError(key, repeated, "distinct class names (each is one output of the classifier)")


def zero_shot_prompts(prompts: Any) -> Tuple[List[str], str]:
    """(the templates as strings with {} for the class name, "imagenet" | "custom") from `model.prompts`: a list of
    templates, one template, or "imagenet" (open_clip's templates are callables; their text is recorded with {})."""
    if prompts is None:
        return list(DEFAULT_PROMPTS), "custom"
    if isinstance(prompts, str) and prompts == IMAGENET_PROMPTS:
        return [template("{}") for template in imagenet_templates()], IMAGENET_PROMPTS
    if isinstance(prompts, (ListConfig, DictConfig)):
        prompts = OmegaConf.to_container(prompts, resolve=True)
    if isinstance(prompts, str) and "{}" in prompts:
        prompts = [prompts]  # one template
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise ConfigError("model.prompts", prompts, "a list of prompt templates with {} for the class name, such "
                          "as ['a photo of a {}.'], or the string 'imagenet' (the CLIP paper's 80 templates)",
                          [IMAGENET_PROMPTS])
    templates = []
    for template in prompts:
        if not isinstance(template, str) or "{}" not in template:
            raise ConfigError("model.prompts", template, "a template with {} where the class name goes, e.g. "
                              "'a photo of a {}.'")
        try:
            template.format("class")
        except (IndexError, KeyError, ValueError) as exc:
            raise ConfigError("model.prompts", template, f"a template whose only braces are one {{}} ({exc}); "
                              f"write a literal brace as {{{{ or }}}}") from exc
        templates.append(template)
    return templates, "custom"


def imagenet_templates() -> Sequence[Callable[[str], str]]:
    """open_clip's OPENAI_IMAGENET_TEMPLATES (the CLIP paper's 80 prompts), for either source."""
    try:
        from open_clip import OPENAI_IMAGENET_TEMPLATES
    except ImportError as exc:
        raise ConfigError("model.prompts", IMAGENET_PROMPTS, "a list of templates: the 'imagenet' templates come "
                          "from open_clip, which is not installed (pip install 'reportgen[clip]')") from exc
    return OPENAI_IMAGENET_TEMPLATES


def zero_shot_facts(names: List[str], templates: List[str], kind: str, classes_from: str
                    ) -> Tuple[Dict[str, Any], str, str]:
    """(the manifest's model.zero_shot entry, the task reason, a note for the page naming the prompts)."""
    facts = {"prompts": list(templates), "templates": kind, "classes_from": classes_from,
             "num_classes": len(names), "num_prompts": len(templates)}
    reason = (f"zero-shot CLIP: {len(names)} classes scored against text embeddings of {len(templates)} "
              f"prompt{'s' if len(templates) != 1 else ''}")
    shown = ", ".join(repr(t) for t in templates[:3]) + (f", ... ({len(templates)} in all)" if len(templates) > 3
                                                         else "")
    source = "the CLIP paper's 80 ImageNet templates: " if kind == IMAGENET_PROMPTS else ""
    note = (f"zero-shot classification of {len(names)} classes (from {classes_from}); each class embedding is the "
            f"normalised mean of its prompts' normalised text embeddings, prompts ({source}{shown})")
    return facts, reason, note


# ---- open_clip -----------------------------------------------------------------------------------------------------

def import_open_clip():
    return require("open_clip", "clip", "model=open_clip")


def check_open_clip_name(name: Optional[str]) -> None:
    """ConfigError (with close matches among open_clip.list_models()) unless open_clip has a config for `name`."""
    open_clip = import_open_clip()
    if not name or str(name).startswith(("hf-hub:", "local-dir:")) or \
            str(name).replace("/", "-") not in open_clip.list_models():
        raise ConfigError("model.name", name, "an open_clip model name (open_clip.list_models(); hf-hub: and "
                          "local-dir: names are not supported: give the architecture and a weights file as "
                          "model.path)", open_clip.list_models())


def load_open_clip(cfg: DictConfig, folder_classes: Sequence[str] = ()) -> LoadedModel:
    """open_clip model `model.name` with the state dict at `model.path` (or random), as a zero-shot classifier."""
    open_clip = import_open_clip()
    check_open_clip_name(cfg.name)
    name = str(cfg.name).replace("/", "-")  # open_clip's own spelling of the config name (ViT-B/32 -> ViT-B-32)
    names, synsets, classes_from = zero_shot_classes(cfg, folder_classes)
    templates, kind = zero_shot_prompts(cfg.get("prompts"))
    if cfg.weights is not None and cfg.weights != "DEFAULT":
        raise ConfigError("model.weights", cfg.weights, "DEFAULT (the state dict file at model.path) or null "
                          "(random initialisation)", ["DEFAULT", "null"])
    path = Path(cfg.path) if cfg.path and cfg.weights is not None else None
    if path is not None and not path.is_file():
        raise ConfigError("model.path", str(path), "an existing open_clip state dict file (.pt, .pth, .bin or "
                          ".safetensors)")
    notes: List[str] = []
    if path is None and cfg.weights is not None:
        notes.append("no model.path was given: the open_clip model is randomly initialised (put its weights file "
                     "in model.path)")
    model = _create_open_clip(open_clip, name, path, cfg)
    model.eval()
    try:
        tokenizer = open_clip.get_tokenizer(name)
    except Exception as exc:  # a tokenizer it would have to download, a missing package
        raise ModelLoadError(f"open_clip could not make the tokenizer of '{name}': "
                             f"{type(exc).__name__}: {exc}") from exc
    with torch.no_grad():  # (D, K)
        classifier = open_clip.build_zero_shot_classifier(model, tokenizer, names, templates,
                                                          num_classes_per_batch=CLASSES_PER_BATCH, device="cpu")
    bias = getattr(model, "logit_bias", None)
    if bias is not None:
        notes.append(SIGLIP_NOTE)
    module = OpenClipZeroShot(model.visual, classifier, model.logit_scale.exp(), bias)
    base, geometry_note = open_clip_preprocess(model.visual)
    preprocess = Preprocess.resolve(cfg.preprocess, base, source="open_clip's preprocess config")
    notes.extend(n for n in (geometry_note, pretrained_tag_note(open_clip, name, preprocess)) if n)
    facts, reason, note = zero_shot_facts(names, templates, kind, classes_from)
    return LoadedModel(module=module, name=name, source="open_clip", library="open_clip",
                       weights=f"checkpoint {path.name}" if path is not None else "random initialisation",
                       weights_file=str(path) if path is not None else None, random_init=path is None,
                       preprocess=preprocess,
                       class_names=names, synsets=synsets, notes=[note] + notes, task="classification",
                       task_reason=reason, zero_shot=facts)


def _create_open_clip(open_clip: Any, name: str, path: Optional[Path], cfg: DictConfig) -> torch.nn.Module:
    """Build `name` and load the file at `path` strictly (weights_only unless trusted), downloading nothing: no
    pretrained tag, and no default tower weights."""
    kwargs = dict(OmegaConf.to_container(cfg.kwargs, resolve=True)) if cfg.kwargs else {}
    trust = bool(cfg.trust_checkpoint)
    try:
        return open_clip.create_model(name, pretrained=str(path) if path is not None else None,
                                      pretrained_image=False, pretrained_text=False, weights_only=not trust, **kwargs)
    except (TypeError, ValueError, AssertionError, KeyError) as exc:
        raise ModelLoadError(f"open_clip.create_model('{name}', **{kwargs}) failed: {type(exc).__name__}: {exc} "
                             f"(check model.kwargs)") from exc
    except RuntimeError as exc:  # a state dict of another architecture, or a tower it would have to download
        first = "\n".join(str(exc).splitlines()[:6])
        raise ModelLoadError(f"open_clip could not build '{name}'" + (f" with the weights {path}" if path else "")
                             + f": {first}\n  check model.name against the architecture the file was saved from"
                             ) from exc
    except Exception as exc:  # a pickle refused by weights_only, a damaged file
        hint = "" if trust else ("; a full pickle is refused unless model.trust_checkpoint=true (it runs code from "
                                 "the file)")
        raise ModelLoadError(f"open_clip could not read {path}: {type(exc).__name__}: {exc}{hint}") from exc


def open_clip_preprocess(visual: torch.nn.Module) -> Tuple[Preprocess, str]:
    """open_clip's evaluation transform (its `preprocess_cfg`) as a Preprocess, with a note where it differs."""
    cfg = dict(getattr(visual, "preprocess_cfg", None) or {})
    size = cfg.get("size", getattr(visual, "image_size", 224))
    if isinstance(size, (list, tuple)):
        if len(set(size)) != 1:
            raise ModelLoadError(f"open_clip's image size {tuple(size)} is not square (only square inputs are "
                                 f"supported)")
        size = size[0]
    resize_mode = str(cfg.get("resize_mode", "shortest"))
    if resize_mode not in OPEN_CLIP_RESIZE:
        raise ModelLoadError(f"open_clip's resize_mode {resize_mode!r} is not supported "
                             f"({sorted(OPEN_CLIP_RESIZE)}); set model.preprocess.crop_mode")
    interpolation = str(cfg.get("interpolation", "bicubic"))
    interpolation = interpolation if interpolation in INTERPOLATIONS else "bicubic"
    from open_clip import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

    base = Preprocess(resize=int(size), crop=int(size), crop_mode=OPEN_CLIP_RESIZE[resize_mode],
                      interpolation=interpolation, mean=tuple(float(m) for m in cfg.get("mean", OPENAI_DATASET_MEAN)),
                      std=tuple(float(s) for s in cfg.get("std", OPENAI_DATASET_STD)), channels=3)
    note = ""
    if resize_mode == "longest" and int(cfg.get("fill_color", 0) or 0) != 0:
        note = "open_clip pads with fill_color; the report pads letterboxed images with the mean colour"
    elif resize_mode == "longest":
        note = "open_clip pads letterboxed images with black; the report pads them with the mean colour"
    return base, note


def pretrained_tag_note(open_clip: Any, name: str, used: Preprocess) -> str:
    """open_clip gives a weights file its model config's preprocessing, but its published weights (pretrained tags)
    may declare other numbers (SigLIP: mean/std 0.5, squash): say so, with the settings, where the numbers used differ
    from what every tag of `name` declares alike."""
    declared: Dict[str, Any] = {}
    for tag in open_clip.list_pretrained_tags_by_model(name):
        tag_cfg = open_clip.get_pretrained_cfg(name, tag) or {}
        for key in ("mean", "std", "interpolation", "resize_mode"):
            if tag_cfg.get(key) is not None:
                declared.setdefault(key, set()).add(tuple(tag_cfg[key]) if key in ("mean", "std") else tag_cfg[key])
    agreed = {key: next(iter(values)) for key, values in declared.items() if len(values) == 1}
    settings = []
    for key in ("mean", "std"):
        if key in agreed and not _close(agreed[key], getattr(used, key)):
            settings.append(f"model.preprocess.{key}=[{','.join(str(v) for v in agreed[key])}]")
    if "interpolation" in agreed and agreed["interpolation"] != used.interpolation:
        settings.append(f"model.preprocess.interpolation={agreed['interpolation']}")
    crop_mode = OPEN_CLIP_RESIZE.get(str(agreed.get("resize_mode")))
    if crop_mode is not None and crop_mode != used.crop_mode:
        settings.append(f"model.preprocess.crop_mode={crop_mode}")
    if not settings:
        return ""
    return (f"open_clip's published weights of {name} were trained with other preprocessing than open_clip gives a "
            f"weights file (which is used here); if model.path holds those weights, set {' '.join(settings)}")


def _close(a: Sequence[float], b: Sequence[float]) -> bool:
    return len(a) == len(b) and all(abs(float(x) - float(y)) < 1e-6 for x, y in zip(a, b))


# ---- transformers (CLIPModel, SiglipModel) -------------------------------------------------------------------------

def load_hf_zero_shot(cfg: DictConfig, folder: Path, label: str, weights_file: Optional[Path],
                      folder_classes: Sequence[str] = ()) -> LoadedModel:
    """A transformers CLIP / SigLIP save_pretrained folder (tokenizer files in it) as a zero-shot classifier."""
    transformers = require("transformers", "hf", "model=hf (Hugging Face transformers)")
    names, synsets, classes_from = zero_shot_classes(cfg, folder_classes)
    templates, kind = zero_shot_prompts(cfg.get("prompts"))
    kwargs = dict(OmegaConf.to_container(cfg.kwargs, resolve=True)) if cfg.kwargs else {}
    config = transformers.AutoConfig.from_pretrained(str(folder), **kwargs)
    if config.model_type == "siglip2":
        raise ModelLoadError(f"{label} is a SigLIP 2 model, whose NaFlex image tower takes variable-size patch "
                             f"sequences rather than (B, C, H, W) images; it is not supported as a zero-shot "
                             f"classifier (CLIPModel and SiglipModel folders are)")
    model = _hf_model(transformers, config, folder, label, weights_file, kwargs)
    tokenizer = _hf_tokenizer(transformers, folder, label)
    with torch.no_grad():
        classifier = hf_text_classifier(model, tokenizer, names, templates)  # (D, K)
    bias = getattr(model, "logit_bias", None)
    notes = [SIGLIP_NOTE] if bias is not None else []
    module = HFZeroShot(model.vision_model, getattr(model, "visual_projection", None), classifier,
                        model.logit_scale.exp(), bias)
    vision_config = getattr(config, "vision_config", config)
    base, processor_notes = processor_preprocess(folder, int(getattr(vision_config, "num_channels", 3) or 3),
                                                 cfg.preprocess, getattr(vision_config, "image_size", None))
    facts, reason, note = zero_shot_facts(names, templates, kind, classes_from)
    weights = f"pretrained {weights_file.name}" if weights_file is not None else "random initialisation"
    return LoadedModel(module=module, name=label, source="hf", library="transformers", weights=weights,
                       weights_file=str(weights_file) if weights_file is not None else None,
                       random_init=weights_file is None,
                       preprocess=Preprocess.resolve(cfg.preprocess, base, source="the image processor config"),
                       class_names=names, synsets=synsets, notes=[note] + notes + processor_notes,
                       task="classification", task_reason=reason, zero_shot=facts)


def _hf_model(transformers: Any, config: Any, folder: Path, label: str, weights_file: Optional[Path],
              kwargs: Dict[str, Any]) -> torch.nn.Module:
    """The image-text model (its own class from config.architectures, else AutoModel), eager attention so the image
    tower's attention weights exist, in eval mode."""
    model_class = architecture_class(transformers, config)
    if model_class is None or not hasattr(model_class, "get_text_features"):
        model_class = transformers.AutoModel
    try:
        model = build_eager(model_class, config, folder, weights_file, kwargs)
    except (OSError, TypeError, ValueError, RuntimeError) as exc:
        raise ModelLoadError(f"transformers could not load {label}: {type(exc).__name__}: {exc}") from exc
    for part in ("vision_model", "logit_scale", "get_text_features"):
        if not hasattr(model, part):
            raise ModelLoadError(f"{label} ({type(model).__name__}) has no {part}: a zero-shot classifier needs an "
                                 f"image-text model such as CLIPModel or SiglipModel")
    return model.eval()


def _hf_tokenizer(transformers: Any, folder: Path, label: str) -> Any:
    try:
        return transformers.AutoTokenizer.from_pretrained(str(folder))
    except (OSError, ValueError, TypeError) as exc:
        raise ModelLoadError(f"{label} has no usable tokenizer ({type(exc).__name__}: {exc}); zero-shot "
                             f"classification encodes the prompts with the model's own tokenizer: save it into the "
                             f"folder (tokenizer.save_pretrained(folder))") from exc


def hf_text_classifier(model: torch.nn.Module, tokenizer: Any, names: Sequence[str], templates: Sequence[str]
                       ) -> torch.Tensor:
    """(D, K) class embeddings from `get_text_features`, as open_clip's build_zero_shot_classifier makes them: each
    prompt normalised, averaged over the templates of its class, normalised again. SigLIP's text tower was trained on
    prompts padded to its full length, so its prompts are padded so too."""
    text_config = getattr(model.config, "text_config", model.config)
    max_length = int(getattr(text_config, "max_position_embeddings", 77))
    siglip = getattr(model, "logit_bias", None) is not None
    columns = []
    for start in range(0, len(names), CLASSES_PER_BATCH):
        batch = names[start:start + CLASSES_PER_BATCH]
        texts = [template.format(name) for name in batch for template in templates]
        tokens = tokenizer(texts, padding="max_length" if siglip else True, truncation=True, max_length=max_length,
                           return_tensors="pt")
        features = text_features(model, tokens)  # (len(batch) * T, D)
        features = F.normalize(features, dim=-1).reshape(len(batch), len(templates), -1).mean(dim=1)  # (b, D)
        columns.append(F.normalize(features, dim=-1).T)  # (D, b)
    return torch.cat(columns, dim=1)  # (D, K)


def text_features(model: torch.nn.Module, tokens: Any) -> torch.Tensor:
    """`get_text_features` as a tensor (transformers 5 returns an output object whose pooler_output is projected)."""
    arguments = {k: tokens[k] for k in ("input_ids", "attention_mask") if k in tokens}
    out = model.get_text_features(**arguments)
    return out if isinstance(out, torch.Tensor) else out.pooler_output  # (N, D)
