"""Reading a weights file into a plain state_dict, and explaining why it does not fit an architecture.

Shared by every source that loads a file (torchvision checkpoints, timm state dicts): `.safetensors` through
safetensors (no code can run), anything else through `torch.load(weights_only=True)` unless the user trusts the file.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Dict, List

import torch

from reportgen.errors import ModelLoadError

log = logging.getLogger(__name__)


def read_state_dict(path: Path, trust: bool = False) -> Dict[str, torch.Tensor]:
    """Load a state_dict; unwrap {'state_dict': ...}/{'model': ...} and DDP/Lightning prefixes."""
    if path.suffix.lower() == ".safetensors":
        return strip_prefixes(_read_safetensors(path))
    try:
        obj = torch.load(path, map_location="cpu", weights_only=not trust)
    except Exception as exc:
        if not trust and "weights_only" in str(exc):
            raise ModelLoadError(
                f"checkpoint {path} is not a plain state_dict: loading it would run code from the pickle, so it was "
                f"refused (torch.load weights_only=True said: {str(exc).splitlines()[0]}).\n"
                f"  Re-save it as a state_dict, or, only if you trust its author, set model.trust_checkpoint=true."
            ) from exc
        raise ModelLoadError(f"could not read checkpoint {path}: {type(exc).__name__}: {exc}") from exc
    if trust:
        log.warning("model.trust_checkpoint=true: %s was unpickled with full trust", path)
    if isinstance(obj, torch.nn.Module):
        obj = obj.state_dict()
    for key in ("state_dict", "model_state_dict", "model", "state_dict_ema"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ModelLoadError(f"checkpoint {path} does not hold a state_dict (a mapping of names to tensors)")
    return strip_prefixes(obj)


def _read_safetensors(path: Path) -> Dict[str, torch.Tensor]:
    try:
        from safetensors.torch import load_file
    except ImportError as exc:
        raise ModelLoadError(f"{path} is a .safetensors file, which needs the safetensors package: "
                             f"pip install 'reportgen[models]' (or pip install safetensors)") from exc
    try:
        return load_file(str(path), device="cpu")
    except Exception as exc:  # header or data not safetensors
        raise ModelLoadError(f"could not read {path} as safetensors: {type(exc).__name__}: {exc}") from exc


def strip_prefixes(state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    for prefix in ("module.", "model."):
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def mismatched_keys(state: Dict[str, torch.Tensor], expected: Dict[str, torch.Tensor]) -> List[str]:
    """Keys present in both whose shapes differ."""
    return [k for k in state if k in expected and state[k].shape != expected[k].shape]


def check_fits(state: Dict[str, torch.Tensor], expected: Dict[str, torch.Tensor], path: Path, arch: str,
               hint: str) -> None:
    """ModelLoadError listing missing, unexpected and mis-shaped keys, unless `state` loads strictly."""
    mismatched = mismatched_keys(state, expected)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if not (missing or unexpected or mismatched):
        return
    lines = [f"checkpoint {path} does not match architecture '{arch}':"]
    if missing:
        lines.append(f"  missing keys ({len(missing)}): {', '.join(missing[:12])}{' ...' if len(missing) > 12 else ''}")
    if unexpected:
        lines.append(f"  unexpected keys ({len(unexpected)}): {', '.join(unexpected[:12])}"
                     f"{' ...' if len(unexpected) > 12 else ''}")
    for k in mismatched[:12]:
        lines.append(f"  shape of {k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}")
    lines.append(f"  {hint}")
    raise ModelLoadError("\n".join(lines))
