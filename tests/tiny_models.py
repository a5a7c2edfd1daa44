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


def sleepy_net() -> SlowNet:
    """0.5 s per batch: a SLURM job that outlasts its time limit with few images (tests/test_slurm.py)."""
    net = SlowNet().eval()
    net.pause_s = 0.5
    return net
