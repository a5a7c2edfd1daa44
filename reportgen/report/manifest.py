"""`results/manifest.json`: what a run, a shard or a failed job was, written by one function so every manifest
carries the same common keys (status, reportgen version, command, composed config, library versions).

The sweep index, the merge and a rerun read these files; the keys are part of the results format.
"""
from __future__ import annotations

import platform
import sys
from pathlib import Path
from typing import Any, Dict

from omegaconf import DictConfig

from reportgen.config.schema import to_container
from reportgen.state.files import write_json

MANIFEST = "manifest.json"  # under results/


def write_manifest(results_dir: Path, status: str, cfg: DictConfig, **fields: Any) -> None:
    """Write results/manifest.json atomically: `status` ("ok", "shard" or "failed"), the common keys, then
    `fields` (counts, timings, the error, ...)."""
    manifest: Dict[str, Any] = {"status": status, "reportgen": reportgen_version(), "command": command_line(),
                                "config": to_container(cfg), "versions": library_versions()}
    manifest.update(fields)
    write_json(results_dir / MANIFEST, manifest)


def command_line() -> str:
    """The command that reproduces this run (Hydra's overrides when under Hydra)."""
    try:
        from hydra.core.hydra_config import HydraConfig

        overrides = list(HydraConfig.get().overrides.task)
        return " ".join(["python run.py", *overrides])
    except Exception:
        return " ".join(["python", *sys.argv])


def reportgen_version() -> str:
    try:
        from importlib.metadata import version

        return version("reportgen")
    except Exception:
        return "dev"


def library_versions() -> Dict[str, str]:
    """Versions that decide the numbers in a report, recorded so it can be reproduced."""
    import hydra
    import jinja2
    import matplotlib
    import numpy
    import PIL
    import torch
    import torchvision

    versions = {
        "python": sys.version.split()[0], "platform": platform.platform(), "torch": torch.__version__,
        "torchvision": torchvision.__version__, "hydra-core": hydra.__version__, "numpy": numpy.__version__,
        "pillow": PIL.__version__, "matplotlib": matplotlib.__version__, "jinja2": jinja2.__version__,
    }
    for name in ("timm", "transformers"):  # the optional model libraries, when this run imported them
        if name in sys.modules:
            versions[name] = str(getattr(sys.modules[name], "__version__", "unknown"))
    if torch.cuda.is_available():
        versions["cuda"] = str(torch.version.cuda)
        versions["gpu"] = torch.cuda.get_device_name(0)
    return versions
