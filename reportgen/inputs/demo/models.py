"""The two demo models (a small CNN and a small torchvision ViT) and their shipped weights.

Both classify 64x64 RGB images of the synthetic shapes dataset (see `shapes.py`); the
configs build them through Hydra `_target_: reportgen.inputs.demo.models.demo_cnn` / `demo_vit`.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torchvision.models import VisionTransformer

from reportgen.inputs.demo.shapes import CLASS_NAMES

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
REGENERATE_COMMAND = "python scripts/train_demo.py"

# The preprocessing both models were trained with: resize the shorter side to 64 (bilinear,
# antialias), center-crop 64x64, scale to [0, 1], normalize with mean/std.
DEMO_PREPROCESS = dict(resize=64, crop=64, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))


class ConvBNReLU(nn.Module):
    """3x3 convolution, batch norm, ReLU: the one building block of DemoCNN."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.bn(self.conv(x)))


def _stage(in_channels: int, out_channels: int) -> nn.Sequential:
    """Halve the resolution and change the width, then one more block at that width."""
    return nn.Sequential(ConvBNReLU(in_channels, out_channels, stride=2), ConvBNReLU(out_channels, out_channels))


class DemoCNN(nn.Module):
    """Small ResNet-shaped CNN (no skips) for 64x64 RGB input; about 0.2M parameters."""

    def __init__(self, num_classes: int = len(CLASS_NAMES)) -> None:
        super().__init__()
        self.stem = ConvBNReLU(3, 16)
        self.layer1 = _stage(16, 32)
        self.layer2 = _stage(32, 64)
        self.layer3 = _stage(64, 96)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(96, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)  # (B, 16, 64, 64)
        x = self.layer1(x)  # (B, 32, 32, 32)
        x = self.layer2(x)  # (B, 64, 16, 16)
        x = self.layer3(x)  # (B, 96, 8, 8)
        x = self.avgpool(x).flatten(1)  # (B, 96)
        return self.fc(x)  # (B, num_classes)


def demo_vit_architecture(num_classes: int = len(CLASS_NAMES)) -> VisionTransformer:
    """A tiny torchvision VisionTransformer: 64x64 input, 8x8 patches (64 tokens + class token)."""
    return VisionTransformer(
        image_size=64, patch_size=8, num_layers=4, num_heads=4, hidden_dim=96, mlp_dim=192,
        num_classes=num_classes,
    )


def _finish(model: nn.Module, weights_name: str, pretrained: bool) -> nn.Module:
    """Load the shipped weights if asked, attach the class names, switch to eval mode."""
    if pretrained:
        path = WEIGHTS_DIR / weights_name
        if not path.is_file():
            raise FileNotFoundError(
                f"Demo weights not found: {path}. Regenerate them from the repository root with: "
                f"{REGENERATE_COMMAND}"
            )
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    model.class_names = list(CLASS_NAMES)
    return model.eval()


def demo_cnn(pretrained: bool = True) -> nn.Module:
    """DemoCNN, with the shipped weights from `weights/demo_cnn.pt` unless pretrained=False."""
    return _finish(DemoCNN(), "demo_cnn.pt", pretrained)


def demo_vit(pretrained: bool = True) -> nn.Module:
    """The demo ViT, with the shipped weights from `weights/demo_vit.pt` unless pretrained=False."""
    return _finish(demo_vit_architecture(), "demo_vit.pt", pretrained)
