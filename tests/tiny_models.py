"""Tiny models with hand-set weights, so expected numbers are exact. Importable as `tests.tiny_models.<factory>`
from a Hydra `_target_`, which is how the end-to-end tests load them."""
from __future__ import annotations

import torch
from torch import nn

LAST_BUILT: dict = {}  # factory name -> the module it returned most recently (tests inspect hooks on it)


class TinyNet(nn.Module):
    """(B, 3, H, W) -> (B, 3) logits. `shared` is called twice (a reused module); `act` is an in-place ReLU that
    runs right after `conv`, whose captured output must not be overwritten."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 2, kernel_size=1, bias=True)
        self.act = nn.ReLU(inplace=True)
        self.shared = nn.Conv2d(2, 2, kernel_size=1, bias=False)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2, 3)
        with torch.no_grad():
            self.conv.weight.copy_(torch.tensor([[1.0, 0.0, 0.0], [0.0, -1.0, 0.0]]).view(2, 3, 1, 1))
            self.conv.bias.copy_(torch.tensor([0.0, 0.5]))
            self.shared.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 2.0]]).view(2, 2, 1, 1))
            self.fc.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, -1.0]]))
            self.fc.bias.copy_(torch.tensor([0.0, 0.0, 0.25]))
        self.class_names = ["red", "green", "blue"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.conv(x))  # (B, 2, H, W)
        x = self.shared(self.shared(x))  # (B, 2, H, W), the same module twice
        return self.fc(self.pool(x).flatten(1))  # (B, 3)


class TiedNet(nn.Module):
    """Two Linear layers sharing one weight tensor (tied weights are counted once)."""

    def __init__(self):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.enc = nn.Linear(12, 12)
        self.dec = nn.Linear(12, 12)
        self.dec.weight = self.enc.weight
        self.head = nn.Linear(12, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dec(self.enc(self.pool(x).flatten(1))))


class ExplodingNet(TinyNet):
    """Raises inside forward when the batch holds a blue-dominant image, after hooks have run on earlier layers."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act(self.conv(x))
        if (x[:, 2].mean(dim=(1, 2)) > 0.5).any():
            raise ValueError("boom: blue image")
        return self.fc(self.pool(out).flatten(1))


def tiny_net() -> TinyNet:
    LAST_BUILT["tiny_net"] = TinyNet().eval()
    return LAST_BUILT["tiny_net"]


def exploding_net() -> ExplodingNet:
    LAST_BUILT["exploding_net"] = ExplodingNet().eval()
    return LAST_BUILT["exploding_net"]


def not_a_module() -> str:
    return "I am a string"


class NaNNet(TinyNet):
    """Returns NaN logits for green-dominant images (a numerically broken model)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = super().forward(x)
        green = (x[:, 1].mean(dim=(1, 2)) > 0.5)[:, None]  # (B, 1)
        return torch.where(green, torch.full_like(logits, float("nan")), logits)


def nan_net() -> NaNNet:
    return NaNNet().eval()


class WideNet(nn.Module):
    """A small seeded CNN with enough channels (12) that choosing which channels to show matters."""

    def __init__(self):
        super().__init__()
        generator = torch.Generator().manual_seed(7)
        self.features = nn.Sequential(nn.Conv2d(3, 12, 3, padding=1), nn.ReLU(), nn.Conv2d(12, 12, 3, padding=1),
                                      nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(12, 3)
        with torch.no_grad():
            for param in self.parameters():
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
        self.class_names = ["red", "green", "blue"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.features(x)).flatten(1))


def wide_net() -> WideNet:
    return WideNet().eval()


class OutOfMemoryNet(WideNet):
    """Raises the out-of-memory error a GPU would when a forward gets more than 3 images."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] > 3:
            raise torch.OutOfMemoryError(f"simulated: {x.shape[0]} images do not fit")
        return super().forward(x)


def out_of_memory_net() -> OutOfMemoryNet:
    return OutOfMemoryNet().eval()


class SlowNet(WideNet):
    """WideNet taking `pause_s` (0.25 s) per forward of more than one image (the pass; one-image probes stay fast),
    so a test can kill a run part-way through its pass."""

    pause_s = 0.25

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import time

        if x.shape[0] > 1:
            time.sleep(self.pause_s)
        return super().forward(x)


def slow_net() -> SlowNet:
    return SlowNet().eval()


# Tiny random timm and transformers models (no downloads), one per family the attention and Grad-CAM analyses
# handle. Heads get normal weights: libraries zero-initialise some heads, which makes every gradient 0.

def _random_head(module: nn.Module, head: nn.Linear) -> nn.Module:
    generator = torch.Generator().manual_seed(11)
    with torch.no_grad():
        head.weight.copy_(torch.randn(head.weight.shape, generator=generator))
    return module.eval()


def timm_vit_tiny(**kwargs) -> nn.Module:
    """timm ViT: 32x32 input, 16 px patches (2x2 grid) + 1 class token, 2 blocks, 3 heads."""
    import timm

    torch.manual_seed(12)
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, depth=2, num_classes=3, **kwargs)
    return _random_head(model, model.head)


def timm_deit_distilled_tiny() -> nn.Module:
    """timm DeiT with a distillation token: 2 prefix tokens (class, distillation), 48x32 input (3x2 grid)."""
    import timm

    torch.manual_seed(13)
    model = timm.create_model("deit_tiny_distilled_patch16_224", img_size=(48, 32), depth=2, num_classes=3)
    _random_head(model, model.head_dist)
    return _random_head(model, model.head)


def timm_convnext_tiny() -> nn.Module:
    import timm

    torch.manual_seed(14)
    model = timm.create_model("convnext_atto", num_classes=3)
    return _random_head(model, model.head.fc)


def timm_swin_tiny() -> nn.Module:
    """timm Swin: 40x40 input, 4 px patches -> 10x10 then 5x5 tokens, window 4 (padded windows, shifted with masks)."""
    import timm

    torch.manual_seed(15)
    model = timm.create_model("swin_tiny_patch4_window7_224", img_size=40, window_size=4, depths=(2, 2),
                              num_heads=(2, 4), embed_dim=16, num_classes=3)
    return _random_head(model, model.head.fc)


def hf_vit_tiny() -> nn.Module:
    """transformers ViT (eager attention) behind the HFClassifier wrapper: 32x32 input, 8 px patches (4x4 grid)."""
    from transformers import ViTConfig, ViTForImageClassification

    from reportgen.inputs.hf_models import HFClassifier

    torch.manual_seed(16)
    config = ViTConfig(image_size=32, patch_size=8, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                       intermediate_size=32, num_labels=3, attn_implementation="eager")
    model = ViTForImageClassification(config)
    return _random_head(HFClassifier(model), model.classifier)


def hf_convnext_tiny() -> nn.Module:
    from transformers import ConvNextConfig, ConvNextForImageClassification

    from reportgen.inputs.hf_models import HFClassifier

    torch.manual_seed(17)
    model = ConvNextForImageClassification(ConvNextConfig(hidden_sizes=[8, 16], depths=[1, 1], num_stages=2,
                                                          num_labels=3))
    return _random_head(HFClassifier(model), model.classifier)


def hf_swin_tiny() -> nn.Module:
    """transformers Swin (eager attention): 40x40 input, 4 px patches -> 10x10 then 5x5 tokens, window 4."""
    from transformers import SwinConfig, SwinForImageClassification

    from reportgen.inputs.hf_models import HFClassifier

    torch.manual_seed(18)
    config = SwinConfig(image_size=40, patch_size=4, embed_dim=16, depths=[2, 2], num_heads=[2, 4], window_size=4,
                        num_labels=3, attn_implementation="eager")
    model = SwinForImageClassification(config)
    return _random_head(HFClassifier(model), model.classifier)


def sleepy_net() -> SlowNet:
    """0.5 s per batch: a SLURM job that outlasts its time limit with few images (tests/test_slurm.py)."""
    net = SlowNet().eval()
    net.pause_s = 0.5
    return net
