"""Class names: reading a labels file, and matching folder names to a model's classes.

Folder classes and model classes rarely agree letter for letter (`golden_retriever` vs `golden retriever`), so both
sides are normalised before matching; an unmatched folder maps to -1 (no accuracy for its images, listed in the report).

ImageNet-layout folders are named by WordNet id (`n01440764/`: ILSVRC val after the usual reorganisation,
ImageNet-V2/-A/-R, imagenette). Such a folder maps by id to the model's output whose synset it is; a 1000-class
ImageNet head's outputs are the sorted list of the 1,000 synsets (shipped in imagenet_1k_synsets.tsv), so subsets
such as ImageNet-A/-R's 200 classes map by id too.
"""
from __future__ import annotations

import json
import re
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import numpy as np

from reportgen.errors import ConfigError


def normalise_class_name(name: str) -> str:
    """'Golden_Retriever' and 'golden retriever' match; so do 'tench, Tinca tinca'-style first names."""
    return re.sub(r"[\s_\-]+", " ", str(name).split(",")[0]).strip().lower()


WORDNET_ID = re.compile(r"^n\d{8}$")  # a WordNet noun synset id, how ImageNet folders are named


def match_labels(dataset_classes: List[str], model_classes: List[str], synsets: Sequence[str] = ()) -> np.ndarray:
    """For each folder class, the model output index: by WordNet id where the folder is named by one and the model's
    outputs have synsets, else the output with the same normalised name; -1 when none matches."""
    by_id = {wnid: index for index, wnid in enumerate(synsets)}
    lookup: Dict[str, int] = {}
    for index, name in enumerate(model_classes):
        lookup.setdefault(normalise_class_name(name), index)
    return np.array([by_id[c] if c in by_id else lookup.get(normalise_class_name(c), -1) for c in dataset_classes],
                    dtype=np.int64)


def output_synsets(synsets: Sequence[str], num_outputs: int) -> Sequence[str]:
    """The WordNet id of each output: the model's own, else ImageNet's sorted order for a nameless 1000-output head."""
    return synsets if synsets or num_outputs != 1000 else imagenet_synsets()


def folder_display_names(dataset_classes: List[str], model_classes: List[str], synsets: Sequence[str] = ()
                         ) -> List[str]:
    """Folder classes as a reader wants them: a WordNet-id folder as 'tench (n01440764)', others unchanged."""
    by_id = {wnid: index for index, wnid in enumerate(synsets)}
    known = dict(imagenet_1k())
    shown = []
    for name in dataset_classes:
        index = by_id.get(name)
        readable = model_classes[index] if index is not None and index < len(model_classes) else known.get(name)
        shown.append(f"{readable.split(',')[0]} ({name})" if WORDNET_ID.match(name) and readable else name)
    return shown


@lru_cache(maxsize=1)
def imagenet_1k() -> Tuple[Tuple[str, str], ...]:
    """(WordNet id, lemmas) of the 1,000 ImageNet-1k classes, in the standard output order (sorted ids)."""
    text = resources.files("reportgen.inputs").joinpath("imagenet_1k_synsets.tsv").read_text(encoding="utf-8")
    rows = [line.split("\t", 1) for line in text.splitlines() if line and not line.startswith("#")]
    return tuple((wnid, lemmas) for wnid, lemmas in rows)


def imagenet_synsets() -> List[str]:
    """The 1,000 ImageNet-1k WordNet ids: output i of a 1000-class ImageNet head is synset i."""
    return [wnid for wnid, _ in imagenet_1k()]


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
