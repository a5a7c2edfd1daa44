"""The local Hugging Face hub cache, where timm and transformers keep pretrained files, and the optional extras.

Files are looked up in `$HF_HUB_CACHE` (default `$HF_HOME/hub`, `HF_HOME` defaulting to `~/.cache/huggingface`),
read when the run starts so a changed environment is honoured. The cache layout is huggingface_hub's:
`models--<org>--<name>/snapshots/<revision>/<file>`, with `refs/main` naming the revision.
"""
from __future__ import annotations

import importlib
import logging
import os
from pathlib import Path
from types import ModuleType
from typing import Optional, Sequence

from reportgen.errors import ModelLoadError

log = logging.getLogger(__name__)


def require(package: str, extra: str, purpose: str) -> ModuleType:
    """Import an optional dependency, or say which extra installs it."""
    try:
        return importlib.import_module(package)
    except ImportError as exc:
        raise ModelLoadError(f"{purpose} needs the '{package}' package, which is not installed: "
                             f"pip install 'reportgen[{extra}]' (or 'reportgen[models]' for timm and transformers)"
                             ) from exc


def hub_cache_dir() -> Path:
    """The folder huggingface_hub caches models in, from the environment as it is now."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    return Path(home).expanduser() / "hub"


def repo_folder(repo_id: str) -> Path:
    """Where the cache keeps one model repository."""
    return hub_cache_dir() / ("models--" + repo_id.replace("/", "--"))


def offline() -> bool:
    """HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) set: never try the network."""
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.strip().lower() in ("1", "true", "yes", "on")


def cached_file(repo_id: str, filename: str) -> Optional[Path]:
    """The cached copy of `filename` at the cache's `main` revision, or None."""
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo_id, filename, cache_dir=str(hub_cache_dir()))
    return Path(found) if isinstance(found, str) else None


def find_or_fetch(repo_id: str, filenames: Sequence[str], what: str) -> Path:
    """The first of `filenames` found in the cache; else a download where the network allows; else one
    ModelLoadError naming the files, where they were looked for, and `model.weights=null`."""
    for name in filenames:
        path = cached_file(repo_id, name)
        if path is not None:
            return path
    error: Optional[BaseException] = None
    if not offline():
        from huggingface_hub import hf_hub_download

        for name in filenames:
            try:
                log.info("%s not in the cache; trying to download %s/%s", what, repo_id, name)
                return Path(hf_hub_download(repo_id, name, cache_dir=str(hub_cache_dir())))
            except Exception as exc:  # no network, no such file, no such repo: all mean "no usable file"
                error = exc
    raise ModelLoadError(missing_message(repo_id, filenames, what, error))


def missing_message(repo_id: str, filenames: Sequence[str], what: str, error: Optional[BaseException]) -> str:
    if error is not None:
        first_line = str(error).splitlines()[0] if str(error) else ""
        reason = f" and could not be downloaded ({type(error).__name__}: {first_line})"
    else:
        reason = " (HF_HUB_OFFLINE is set, so no download was tried)" if offline() else ""
    return (f"{what}: none of {', '.join(filenames)} of the Hugging Face repository '{repo_id}' is in the local "
            f"hub cache{reason}.\n"
            f"  Looked in: {repo_folder(repo_id)}/snapshots/<revision>/ (revision from refs/main)\n"
            f"  The cache folder is $HF_HUB_CACHE, else $HF_HOME/hub (HF_HOME defaults to ~/.cache/huggingface);\n"
            f"  fill it on a machine with network (huggingface-cli download {repo_id}) and copy it over,\n"
            f"  or run with random weights: model.weights=null")
