"""Class names: reading a labels file, and matching folder names to a model's classes.

Folder classes and model classes rarely agree letter for letter (`golden_retriever` vs `golden retriever`), so both
sides are normalised before matching; an unmatched folder maps to -1 (no accuracy for its images, listed in the report).
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Dict, List

import numpy as np

from reportgen.errors import ConfigError


def normalise_class_name(name: str) -> str:
    """'Golden_Retriever' and 'golden retriever' match; so do 'tench, Tinca tinca'-style first names."""
    return re.sub(r"[\s_\-]+", " ", str(name).split(",")[0]).strip().lower()


def match_labels(dataset_classes: List[str], model_classes: List[str]) -> np.ndarray:
    """For each folder class, the model output index with the same normalised name, or -1."""
    lookup: Dict[str, int] = {}
    for index, name in enumerate(model_classes):
        lookup.setdefault(normalise_class_name(name), index)
    return np.array([lookup.get(normalise_class_name(c), -1) for c in dataset_classes], dtype=np.int64)


def display_names(class_names: List[str], num_outputs: int) -> List[str]:
    """One readable name per logit: the known names, then 'class i' for any output without one."""
    return [class_names[i] if i < len(class_names) else f"class {i}" for i in range(num_outputs)]



def read_labels_file(path: Path) -> List[str]:
    """Class names from a .json list (or {index: name} mapping) or a text file with one name per line."""
    if not path.is_file():
        raise ConfigError("model.labels_file", str(path), "an existing .txt or .json file of class names")
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".json":
        data = json.loads(text)
        if isinstance(data, dict):
            return [str(data[k]) for k in sorted(data, key=lambda k: int(k))]
        return [str(x) for x in data]
    return [line.strip() for line in text.splitlines() if line.strip()]
