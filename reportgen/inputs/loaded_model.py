"""What every model source returns: the module plus what the report must know about it."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import torch

from reportgen.inputs.preprocess import Preprocess


@dataclass
class LoadedModel:
    """A ready-to-run module (called with a (B, C, H, W) batch; what it returns depends on `task`) and its facts."""

    module: torch.nn.Module
    name: str  # short display name, e.g. "resnet18", "vit_small_patch16_224" or "google/vit-base-patch16-224"
    source: str  # torchvision | checkpoint | target | timm | hf
    weights: str  # what the parameters are: enum name, checkpoint path, "random initialisation", ...
    random_init: bool  # True: predictions mean nothing; the report shows a banner
    preprocess: Preprocess
    class_names: List[str]  # one per output logit ("class 17" when unknown)
    notes: List[str] = field(default_factory=list)  # things the report should mention (e.g. inferred num_classes)
    library: Optional[str] = None  # the library that built the module: torchvision | timm | transformers
    weights_file: Optional[str] = None  # the file the parameters were read from (None: built in, or random)
    synsets: List[str] = field(default_factory=list)  # WordNet id per output (ImageNet heads), for n0... folders
    multi_label: bool = False  # the head's outputs are independent (sigmoid) probabilities, not one softmax
    task: Optional[str] = None  # classification | embedding | segmentation | detection; None: decided by a probe
    task_reason: str = ""  # why: what the library says (e.g. "timm num_classes=0"), or what the probe saw
    pooling: str = ""  # embedding: how the model pools its features into the output (class token, mean of patches)
    token_layer: Optional[str] = None  # embedding: the module whose output is the final (B, prefix + N, D) tokens
    prefix_tokens: int = 0  # embedding: class + register (+ distillation) tokens before the patch tokens
    zero_shot: Dict[str, Any] = field(default_factory=dict)  # zero-shot CLIP: the prompts and class source used

    def describe(self) -> Dict[str, Any]:
        """The manifest's `model` entry."""
        return {"name": self.name, "source": self.source, "library": self.library, "weights": self.weights,
                "weights_file": self.weights_file, "random_init": self.random_init,
                "num_class_names": len(self.class_names), "multi_label": self.multi_label,
                "preprocess": self.preprocess.describe(), "task": self.task, "task_reason": self.task_reason,
                **({"pooling": self.pooling} if self.pooling else {}),
                **({"zero_shot": self.zero_shot} if self.zero_shot else {})}


def first_input_channels(module: torch.nn.Module) -> Optional[int]:
    """Input channels of the first convolution (a patch embedding is one too), or None for conv-less models."""
    for sub in module.modules():
        if isinstance(sub, (torch.nn.Conv2d, torch.nn.Conv1d, torch.nn.Conv3d)):
            return int(sub.in_channels)
    return None
