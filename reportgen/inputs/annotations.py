"""Ground-truth boxes of a detection run (`dataset.annotations`), read from one of the three formats people have and
matched to the scanned images by file name:

- a COCO instances `.json` file: `images[].file_name` is matched to the scanned relative path, else to its base
  name when exactly one scanned image has it; `annotations[].bbox` [x, y, w, h] becomes xyxy; `iscrowd` and `area`
  are kept (COCO evaluation ignores crowd regions and buckets objects by `area`, not by box size);
- a YOLO labels folder of `.txt` files: `<stem>.txt` at the image's relative path (`a/b.jpg` -> `a/b.txt`), else
  flat (`b.txt`) when no other scanned image has that stem; one `class cx cy w h` line per object, normalised to
  [0, 1] of the image's width and height; class names from `data.yaml` (`names:` list or dict) or `classes.txt`
  in the labels folder, its parent or the parent's parent (the first found wins, data.yaml before classes.txt);
- a Pascal VOC Annotations folder of `.xml` files, found like YOLO's (`a/b.xml`, else flat `b.xml`):
  `<object><name>`, `<difficult>` and `<bndbox>` xmin ymin xmax ymax.

What each image gets: `GroundTruth.images[path]` for a labelled image (possibly with zero objects), or its path in
`GroundTruth.unlabelled`. A YOLO or VOC image with no label file is unlabelled, one with an empty file has zero
objects; a COCO image absent from `images[]` is unlabelled, one listed without annotations has zero objects.

Every malformed entry is a (location, reason) pair in `GroundTruth.problems`, never silently dropped: the location
names the annotation file relative to `dataset.annotations` and the line (YOLO), the object's 1-based index (VOC)
or the annotation id (COCO). A bad entry is left out of the ground truth and the rest of its image is kept. A path
or file that cannot be used at all (missing, not JSON, no label files) raises ConfigError.

Boxes are xyxy in pixels of the image as decoded. VOC's coordinates are 1-based pixel indices (the top-left pixel
is (1, 1), and xmax is the last pixel inside the box): they are used as given, NOT shifted by one, as torchvision's
VOCDetection, detectron2 and the Ultralytics VOC converter do, because a shift of one pixel moves IoU by less than
the annotation noise and shifting would make boxes disagree with every other tool reading the same files; the
width is therefore xmax - xmin, one pixel less than VOC's own inclusive count.
"""
from __future__ import annotations

import json
import math
import os
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePosixPath
from typing import Any, Dict, List, Mapping, NamedTuple, Optional, Sequence, Tuple

import numpy as np
import yaml  # PyYAML, a dependency of hydra-core

from reportgen.errors import ConfigError
from reportgen.inputs.paths import escape_name, os_name

KEY = "dataset.annotations"
FORMATS = ("coco", "yolo", "voc")
_EXPECTED = ("a COCO instances .json file, a YOLO labels folder (<stem>.txt files, class names in data.yaml or "
             "classes.txt beside it) or a Pascal VOC Annotations folder (<stem>.xml files), or null for a run "
             "without ground truth")
# names that hold a slot in a model's label list without being a class (torchvision's COCO and VOC metadata)
PLACEHOLDER_NAMES = ("n/a", "__background__")
_SHOWN = 5  # example names in a summary problem line


class Category(NamedTuple):
    """One class of the annotations: its id as the boxes' `labels` hold it, and its name."""

    id: int
    name: str


@dataclass
class ImageBoxes:
    """The ground-truth objects of one labelled image (N may be 0)."""

    boxes: np.ndarray  # (N, 4) float64 xyxy: pixels, or fractions of (width, height) while `normalized`
    labels: np.ndarray  # (N,) int64 category ids (see GroundTruth.id_rule)
    ignore: np.ndarray  # (N,) bool: COCO `iscrowd` or VOC `difficult`: regions scored as neither hit nor miss
    area: np.ndarray  # (N,) float64: COCO's `area` where given (the mask's area), else the box's area in pixels;
    #   NaN while `normalized`
    normalized: bool = False  # YOLO boxes before to_pixels: fractions of the image's width and height

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def to_pixels(self, height: int, width: int) -> "ImageBoxes":
        """These boxes in pixels of an image of `height` x `width` (YOLO's normalised boxes scaled, the area
        computed from the scaled box); pixel boxes come back unchanged."""
        if not self.normalized:
            return self
        scale = np.array([width, height, width, height], dtype=np.float64)  # (4,)
        boxes = self.boxes * scale  # (N, 4)
        area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])  # (N,)
        return replace(self, boxes=boxes, area=area, normalized=False)

    @staticmethod
    def empty() -> "ImageBoxes":
        """A labelled image with zero objects."""
        return _image_boxes([], [], [], [], normalized=False)


@dataclass
class GroundTruth:
    """What `read_annotations` found; see the module docstring for the matching rules."""

    format: str  # "coco" | "yolo" | "voc"
    categories: List[Category]  # every class of the annotations, sorted by id
    id_rule: str  # the id <-> name mapping in words, for the report
    images: Dict[str, ImageBoxes]  # labelled image (escaped relative path) -> its objects
    unlabelled: List[str]  # scanned images the annotations say nothing about (not a problem)
    problems: List[Tuple[str, str]] = field(default_factory=list)  # (location, reason), one per malformed entry
    sizes: Dict[str, Tuple[int, int]] = field(default_factory=dict)  # (height, width) the annotation file states
    #   for an image (COCO images[].height/width, VOC <size>), to cross-check against the decoded image

    @property
    def names(self) -> Dict[int, str]:
        """Category id -> name."""
        return {c.id: c.name for c in self.categories}

    @property
    def normalized(self) -> bool:
        """Whether some image still holds normalised (YOLO) boxes: call `resolved` with the image sizes first."""
        return any(b.normalized for b in self.images.values())

    def resolved(self, sizes: Mapping[str, Tuple[int, int]]) -> "GroundTruth":
        """A copy with every box in pixels, given each image's decoded (height, width). A labelled image with
        normalised boxes and no size (it failed to decode) leaves the ground truth, with one summary problem."""
        images: Dict[str, ImageBoxes] = {}
        no_size = []
        for path, boxes in self.images.items():
            if not boxes.normalized:
                images[path] = boxes
            elif path in sizes:
                images[path] = boxes.to_pixels(*sizes[path])
            else:
                no_size.append(path)
        problems = list(self.problems)
        if no_size:
            problems.append((no_size[0], f"{len(no_size)} labelled images have no known size (e.g. they failed to "
                                         "decode), so their normalised YOLO boxes cannot be scaled to pixels: "
                                         f"{_examples(no_size)}; they are not scored"))
        return replace(self, images=images, problems=problems)


def read_annotations(path: Path, image_paths: Sequence[str],
                     image_sizes: Optional[Mapping[str, Tuple[int, int]]] = None,
                     names: Optional[Sequence[str]] = None, format: Optional[str] = None) -> GroundTruth:
    """The ground truth under `path` (dataset.annotations) for the scanned images `image_paths` (escaped relative
    posix paths, see reportgen.inputs.paths).

    `format`: "coco", "yolo" or "voc"; None detects it (a .json file is COCO; a folder is YOLO when it holds .txt
    label files, VOC when it holds .xml files). `image_sizes`: decoded (height, width) per image, to scale YOLO's
    normalised boxes to pixels now; without it YOLO boxes stay normalised until `GroundTruth.resolved(sizes)`.
    `names`: the class names in id order, for YOLO (instead of data.yaml / classes.txt) or VOC (ids are positions
    in it, instead of the sorted names found); COCO files carry their own categories.
    """
    path = Path(path)
    if format is not None and format not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)} or None (detect), got {format!r}")
    if not os.path.lexists(path):
        raise ConfigError(KEY, str(path), f"an existing file or folder: {_EXPECTED}")
    images = [str(p) for p in image_paths]
    if format is None:
        format = _detect(path)
    if format == "coco":
        if names is not None:
            raise ValueError("names cannot be given for a COCO file: its categories[] name the classes")
        truth = _read_coco(path, images)
    else:
        if not path.is_dir():
            raise ConfigError(KEY, str(path), f"a folder of {'.txt' if format == 'yolo' else '.xml'} label files "
                                              f"for the {format.upper()} format")
        truth = _read_yolo(path, images, names) if format == "yolo" else _read_voc(path, images, names)
    return truth.resolved(image_sizes) if image_sizes is not None and truth.normalized else truth


def _detect(path: Path) -> str:
    """The format of `path`: a .json file is COCO; a folder holding .txt files YOLO, one holding .xml files VOC."""
    if path.is_file():
        if path.suffix.lower() == ".json":
            return "coco"
        raise ConfigError(KEY, str(path), _EXPECTED)
    if not path.is_dir():
        raise ConfigError(KEY, str(path), _EXPECTED)
    files = _walk(path)
    txt = any(rel.lower().endswith(".txt") and rel != "classes.txt" for rel in files)
    xml = any(rel.lower().endswith(".xml") for rel in files)
    if txt and xml:
        raise ConfigError(KEY, str(path), "a folder of one format, but it holds both .txt (YOLO) and .xml (Pascal "
                                          "VOC) label files; point it at the folder of one of them")
    if txt:
        return "yolo"
    if xml:
        return "voc"
    raise ConfigError(KEY, str(path), f"a folder holding label files, but it has no .txt or .xml file: {_EXPECTED}")


# ---------------------------------------------------------------------------------------------------------- COCO


def _read_coco(path: Path, images: List[str]) -> GroundTruth:
    """COCO instances: categories keep their ids (gaps and all), boxes [x, y, w, h] -> xyxy."""
    where = escape_name(path.name)
    try:
        with open(path, "rb") as handle:
            data = json.load(handle)
    except (OSError, ValueError) as exc:
        raise ConfigError(KEY, str(path), f"a readable COCO instances JSON file ({type(exc).__name__}: {exc})")
    if not isinstance(data, dict) or not isinstance(data.get("images"), list) \
            or not isinstance(data.get("annotations", []), list) or not isinstance(data.get("categories"), list):
        raise ConfigError(KEY, str(path), "a COCO instances JSON file: an object with lists 'images', "
                                          "'annotations' and 'categories'")
    problems: List[Tuple[str, str]] = []
    categories: Dict[int, str] = {}
    for index, cat in enumerate(data["categories"]):
        cid = cat.get("id") if isinstance(cat, dict) else None
        if not _is_int(cid):
            problems.append((f"{where} categories[{index}]", f"category id {cid!r} is not an integer"))
        elif cid in categories:
            problems.append((f"{where} categories[{index}]", f"category id {cid} appears twice; the first is kept"))
        else:
            categories[int(cid)] = str(cat.get("name", cid))
    scanned = set(images)
    by_base: Dict[str, List[str]] = {}
    for image in images:
        by_base.setdefault(PurePosixPath(image).name, []).append(image)
    image_of: Dict[Any, Optional[str]] = {}  # COCO image id -> scanned path (None: listed but not in the folder)
    taken: Dict[str, Any] = {}
    sizes: Dict[str, Tuple[int, int]] = {}
    for index, entry in enumerate(data["images"]):
        iid = entry.get("id") if isinstance(entry, dict) else None
        label = f"{where} images[{index}]"
        if not _is_int(iid) or not isinstance(entry.get("file_name"), str):
            problems.append((label, "an image needs an integer 'id' and a string 'file_name'"))
            continue
        if iid in image_of:
            problems.append((label, f"image id {iid} appears twice; the first is kept"))
            continue
        name, reason = _match_coco_name(entry["file_name"], scanned, by_base)
        if reason:
            problems.append((label, reason))
        if name is not None and name in taken:
            problems.append((label, f"file_name {entry['file_name']!r} is the scanned image {name!r}, which image "
                                    f"id {taken[name]} already is; this entry is ignored"))
            name = None
        image_of[iid] = name
        if name is not None:
            taken[name] = iid
            if _is_int(entry.get("height")) and _is_int(entry.get("width")):
                sizes[name] = (int(entry["height"]), int(entry["width"]))
    rows: Dict[str, List[List[Any]]] = {name: [] for name in taken}  # path -> [box, category, crowd, area] rows
    outside_annotations, outside_images = 0, set()
    for index, ann in enumerate(data.get("annotations", [])):
        if not isinstance(ann, dict):
            problems.append((f"{where} annotations[{index}]", "an annotation must be a JSON object"))
            continue
        label = f"{where} annotation id {ann['id']}" if "id" in ann else f"{where} annotations[{index}]"
        iid = ann.get("image_id")
        if not _is_int(iid) or iid not in image_of:
            problems.append((label, f"image_id {iid!r} is not in images[]"))
            continue
        if image_of[iid] is None:
            outside_annotations += 1
            outside_images.add(iid)
            continue
        row, reason = _coco_row(ann, categories)
        if reason:
            problems.append((label, reason))
        if row is not None:
            rows[image_of[iid]].append(row)
    if outside_annotations:
        problems.append((where, f"{outside_annotations} annotations on {len(outside_images)} images listed in "
                                "images[] whose file_name matches no scanned image (another split, or a folder "
                                "scanned with dataset.limit or a shard?); they are not scored"))
    labelled = {name: _image_boxes(*zip(*r)) if r else ImageBoxes.empty() for name, r in rows.items()}
    ids = sorted(categories)
    gaps = ids and (ids[-1] - ids[0] + 1 != len(ids))
    rule = (f"COCO category ids as in the file: {len(ids)} categories"
            + (f", ids {ids[0]}..{ids[-1]}" if ids else "") + (" with gaps" if gaps else "")
            + "; a model's label ids are matched to them by name (match_categories)")
    return GroundTruth("coco", [Category(i, categories[i]) for i in ids], rule, labelled,
                       [p for p in images if p not in labelled], problems, sizes)


def _match_coco_name(file_name: str, scanned: set, by_base: Dict[str, List[str]]) -> Tuple[Optional[str], str]:
    """The scanned image a COCO file_name is (exact relative path, else unique base name), and why not."""
    try:
        name = escape_name(file_name.replace("\\", "/"))  # written on Windows: a backslash separates folders
    except UnicodeError:
        return None, f"file_name {file_name!r} is no valid file name"
    while name.startswith("./"):
        name = name[2:]
    if name in scanned:
        return name, ""
    matches = by_base.get(PurePosixPath(name).name, [])
    if len(matches) == 1:
        return matches[0], ""
    if len(matches) > 1:
        return None, (f"file_name {file_name!r} is no scanned relative path and its base name fits "
                      f"{len(matches)} scanned images ({_examples(matches)}); it is not scored")
    return None, ""


def _coco_row(ann: Dict[str, Any], categories: Dict[int, str]) -> Tuple[Optional[List[Any]], str]:
    """[xyxy box, category id, crowd, area] of one COCO annotation, or None with the reason it was left out (or
    a row and a warning)."""
    cid = ann.get("category_id")
    if not _is_int(cid) or int(cid) not in categories:
        return None, f"category_id {cid!r} is not in categories[]"
    bbox = ann.get("bbox")
    if not isinstance(bbox, list) or len(bbox) != 4:
        return None, f"bbox must be a list [x, y, width, height], got {bbox!r}"
    if not all(_is_number(v) for v in bbox):
        return None, f"bbox {bbox!r} holds something that is not a finite number"
    x, y, w, h = (float(v) for v in bbox)
    if w <= 0 or h <= 0:
        return None, f"bbox {bbox!r} has a width or height that is not positive"
    crowd = ann.get("iscrowd", 0)
    if crowd not in (0, 1, True, False):
        return None, f"iscrowd must be 0 or 1, got {crowd!r}"
    area = ann.get("area")
    reason = ""
    if area is None:
        area = w * h
    elif not _is_number(area) or area < 0:
        reason = f"area {area!r} is not a non-negative number; the box's area {w * h:g} is used"
        area = w * h
    return [[x, y, x + w, y + h], int(cid), bool(crowd), float(area)], reason


# ---------------------------------------------------------------------------------------------------------- YOLO


def _read_yolo(root: Path, images: List[str], names: Optional[Sequence[str]]) -> GroundTruth:
    """YOLO labels: 0-based class ids into the names, boxes kept normalised until the image sizes are known."""
    problems: List[Tuple[str, str]] = []
    if names is not None:
        name_of, source = {i: str(n) for i, n in enumerate(names)}, "the names given"
    else:
        name_of, source = _yolo_names(root, problems)
    files = _label_files(root, ".txt")
    assigned = _assign_files(images, files, ".txt", problems)
    labelled: Dict[str, ImageBoxes] = {}
    found_ids = set()
    for image, rel in assigned.items():
        text = _read_text(root, rel, problems)
        if text is None:
            continue
        rows = []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            row, reason = _yolo_row(line, name_of)
            if reason:
                problems.append((f"{rel}:{number}", reason))
            else:
                rows.append(row)
                found_ids.add(row[1])
        labelled[image] = _image_boxes(*zip(*rows), normalized=True) if rows else \
            replace(ImageBoxes.empty(), normalized=True)
    if name_of is None:
        name_of = {i: str(i) for i in sorted(found_ids)}
        rule = ("YOLO class ids (0-based) with no names found (no data.yaml or classes.txt in the labels folder, its "
                "parent or the parent's parent): each class is named by its id")
    else:
        rule = f"YOLO class ids are 0-based indices into the {len(name_of)} names of {source}"
    categories = [Category(i, name_of[i]) for i in sorted(name_of)]
    return GroundTruth("yolo", categories, rule, labelled, [p for p in images if p not in labelled], problems)


def _yolo_names(root: Path, problems: List[Tuple[str, str]]) -> Tuple[Optional[Dict[int, str]], str]:
    """Class id -> name from the first data.yaml / data.yml / classes.txt in the labels folder, its parent or the
    parent's parent; (None, "") when there is none."""
    for up, folder in enumerate((root, root.parent, root.parent.parent)):
        for file_name in ("data.yaml", "data.yml", "classes.txt"):
            candidate = folder / file_name
            if not candidate.is_file():
                continue
            where = "../" * up + file_name  # relative to the labels folder
            try:
                text = candidate.read_bytes().decode("utf-8-sig")
                if file_name == "classes.txt":
                    listed = [line.strip() for line in text.splitlines() if line.strip()]
                    return dict(enumerate(listed)) or None, where
                data = yaml.safe_load(text)
            except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
                problems.append((where, f"could not be read ({type(exc).__name__}: {exc}); it is not used"))
                continue
            raw = data.get("names") if isinstance(data, dict) else None
            if isinstance(raw, list):
                return {i: str(n) for i, n in enumerate(raw)}, where
            if isinstance(raw, dict) and all(_is_int(k) and int(k) >= 0 for k in raw):
                return {int(k): str(v) for k, v in raw.items()}, where
            problems.append((where, "has no 'names:' list, nor dict of 0-based class ids -> names; it is not "
                                    "used"))
    return None, ""


def _yolo_row(line: str, name_of: Optional[Dict[int, str]]) -> Tuple[Optional[List[Any]], str]:
    """[normalised xyxy box, class id, False, NaN] of one label line, or None with the reason it was left out."""
    fields = line.split()
    if len(fields) != 5:
        polygon = " (a polygon: YOLO segmentation labels are not detection labels)" \
            if len(fields) >= 7 and len(fields) % 2 == 1 else ""
        return None, f"{len(fields)} fields{polygon}; expected 5: class cx cy w h"
    try:
        values = [float(v) for v in fields]
    except ValueError:
        return None, f"{line.strip()!r} holds something that is not a number"
    if not all(math.isfinite(v) for v in values):
        return None, f"{line.strip()!r} holds a value that is not finite"
    cls, cx, cy, w, h = values
    if cls != int(cls) or cls < 0:
        return None, f"class {fields[0]!r} is not a non-negative integer"
    cls = int(cls)
    if name_of is not None and cls not in name_of:
        return None, f"class {cls} is not among the {len(name_of)} class names (ids {_id_range(name_of)})"
    if not all(0.0 <= v <= 1.0 for v in (cx, cy, w, h)):
        return None, f"cx cy w h {fields[1:]} must be normalised to [0, 1] of the image's width and height"
    if w <= 0 or h <= 0:
        return None, f"box width {fields[3]} or height {fields[4]} is not positive"
    return [[cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], cls, False, math.nan], ""


# ----------------------------------------------------------------------------------------------------------- VOC


def _read_voc(root: Path, images: List[str], names: Optional[Sequence[str]]) -> GroundTruth:
    """Pascal VOC XML: names are strings, ids assigned in sorted name order (or positions in `names`)."""
    problems: List[Tuple[str, str]] = []
    files = _label_files(root, ".xml")
    assigned = _assign_files(images, files, ".xml", problems)
    parsed: Dict[str, List[List[Any]]] = {}  # image -> [box, name, difficult, area, object index] rows
    sizes: Dict[str, Tuple[int, int]] = {}
    for image, rel in assigned.items():
        text = _read_text(root, rel, problems)
        if text is None:
            continue
        try:
            tree = ElementTree.fromstring(text)
        except ElementTree.ParseError as exc:
            problems.append((rel, f"is not well-formed XML ({exc}); the image is treated as unlabelled"))
            continue
        size = _voc_size(tree)
        if size is not None:
            sizes[image] = size
        rows = []
        for index, obj in enumerate(tree.findall("object"), start=1):
            row, reason = _voc_row(obj)
            if reason:
                problems.append((f"{rel} object {index}", reason))
            else:
                rows.append(row + [index])
        parsed[image] = rows
    found = sorted({row[1] for rows in parsed.values() for row in rows})
    if names is not None:
        id_of = {str(n): i for i, n in enumerate(names)}
        rule = f"VOC object names -> ids by their position in the {len(id_of)} names given"
    else:
        id_of = {n: i for i, n in enumerate(found)}
        rule = f"VOC object names -> ids 0..{len(found) - 1} in sorted order of the {len(found)} names found"
    labelled: Dict[str, ImageBoxes] = {}
    for image, rows in parsed.items():
        kept = []
        for row in rows:
            if row[1] in id_of:
                kept.append([row[0], id_of[row[1]], row[2], row[3]])
            else:
                problems.append((f"{assigned[image]} object {row[4]}", f"name {row[1]!r} is not among the "
                                                                       f"{len(id_of)} names given"))
        labelled[image] = _image_boxes(*zip(*kept)) if kept else ImageBoxes.empty()
    categories = sorted((Category(i, n) for n, i in id_of.items()), key=lambda c: c.id)
    return GroundTruth("voc", categories, rule, labelled, [p for p in images if p not in labelled], problems, sizes)


def _voc_size(tree: ElementTree.Element) -> Optional[Tuple[int, int]]:
    """(height, width) from <size>, when present and whole."""
    try:
        height, width = int(tree.findtext("size/height")), int(tree.findtext("size/width"))
    except (TypeError, ValueError):
        return None
    return (height, width) if height > 0 and width > 0 else None


def _voc_row(obj: ElementTree.Element) -> Tuple[Optional[List[Any]], str]:
    """[xyxy box, name, difficult, area] of one <object>, or None with the reason it was left out."""
    name = (obj.findtext("name") or "").strip()
    if not name:
        return None, "has no <name>"
    box = obj.find("bndbox")
    if box is None:
        return None, f"{name!r} has no <bndbox>"
    values = []
    for tag in ("xmin", "ymin", "xmax", "ymax"):
        text = (box.findtext(tag) or "").strip()
        try:
            value = float(text)
        except ValueError:
            return None, f"{name!r}: <{tag}> {text!r} is not a number"
        if not math.isfinite(value):
            return None, f"{name!r}: <{tag}> {text!r} is not finite"
        values.append(value)
    xmin, ymin, xmax, ymax = values
    if xmax <= xmin or ymax <= ymin:
        return None, f"{name!r}: box {values} has a width or height that is not positive (xmax <= xmin or " \
                     "ymax <= ymin)"
    difficult = (obj.findtext("difficult") or "0").strip()
    if difficult not in ("0", "1"):
        return None, f"{name!r}: <difficult> must be 0 or 1, got {difficult!r}"
    return [values, name, difficult == "1", (xmax - xmin) * (ymax - ymin)], ""


# -------------------------------------------------------------------------------------------------------- shared


def _walk(root: Path) -> List[str]:
    """Escaped posix paths, relative to `root`, of every file under it (links to folders not followed)."""
    found = []
    for folder, subfolders, files in os.walk(root):
        subfolders.sort()
        relative = os.path.relpath(folder, root)
        for name in sorted(files):
            joined = name if relative == "." else os.path.join(relative, name)
            found.append(escape_name(joined.replace(os.sep, "/")))
    return found


def _label_files(root: Path, suffix: str) -> List[str]:
    """The label files of one suffix under `root` (`classes.txt` at the top is the names file, not a label)."""
    return [rel for rel in _walk(root) if rel.lower().endswith(suffix) and rel != "classes.txt"]


def _assign_files(images: List[str], files: List[str], suffix: str,
                  problems: List[Tuple[str, str]]) -> Dict[str, str]:
    """Image -> its label file: `a/b<suffix>` for image `a/b.jpg`, else flat `b<suffix>` when `b` is the stem of no
    other scanned image. Files no image takes are one summary problem."""
    available = set(files)
    by_nested: Dict[str, List[str]] = {}
    by_flat: Dict[str, List[str]] = {}
    for image in images:
        pure = PurePosixPath(image)
        by_nested.setdefault(str(pure.with_suffix(suffix)), []).append(image)
        by_flat.setdefault(pure.stem + suffix, []).append(image)
    assigned: Dict[str, str] = {}
    used = set()
    for image in images:
        pure = PurePosixPath(image)
        for rel, sharing in ((str(pure.with_suffix(suffix)), by_nested), (pure.stem + suffix, by_flat)):
            if rel not in available:
                continue
            if len(sharing[rel]) > 1:
                if rel not in used:
                    problems.append((rel, f"fits {len(sharing[rel])} scanned images ({_examples(sharing[rel])}), "
                                          "which are treated as unlabelled; give each image its own label file "
                                          "at its relative path"))
            else:
                assigned[image] = rel
            used.add(rel)
            break
    unused = [f for f in files if f not in used]
    if unused:
        problems.append((unused[0], f"{len(unused)} label files match no scanned image ({_examples(unused)}); "
                                    "they are not scored"))
    return assigned


def _read_text(root: Path, rel: str, problems: List[Tuple[str, str]]) -> Optional[str]:
    """The UTF-8 text of a label file, or None with a problem (the image is then unlabelled)."""
    try:
        return (root / os_name(rel)).read_bytes().decode("utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        problems.append((rel, f"could not be read ({type(exc).__name__}); the image is treated as unlabelled"))
        return None


def _image_boxes(boxes: Sequence[Sequence[float]], labels: Sequence[int], ignore: Sequence[bool],
                 area: Sequence[float], *rest: Any, normalized: bool = False) -> ImageBoxes:
    """ImageBoxes from per-object rows (extra row fields are ignored)."""
    return ImageBoxes(boxes=np.asarray(boxes, dtype=np.float64).reshape(-1, 4),
                      labels=np.asarray(labels, dtype=np.int64).reshape(-1),
                      ignore=np.asarray(ignore, dtype=bool).reshape(-1),
                      area=np.asarray(area, dtype=np.float64).reshape(-1), normalized=normalized)


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_)) \
        and math.isfinite(float(value))


def _id_range(name_of: Dict[int, str]) -> str:
    ids = sorted(name_of)
    return f"{ids[0]}..{ids[-1]}" if ids == list(range(ids[0], ids[-1] + 1)) else ", ".join(map(str, ids[:10]))


def _examples(items: Sequence[str]) -> str:
    shown = ", ".join(repr(i) for i in items[:_SHOWN])
    return shown + (f" and {len(items) - _SHOWN} more" if len(items) > _SHOWN else "")


# ------------------------------------------------------------------------------------------ model label mapping


@dataclass
class CategoryMatch:
    """How a model's label ids map onto the annotations' category ids, matched by name."""

    model_to_dataset: Dict[int, int]  # model label id -> dataset category id
    unmatched_dataset: List[str]  # dataset category names no model label has: never predicted, always missed
    unmatched_model: List[str]  # model label names the dataset lacks (placeholders such as 'N/A' left out):
    #   their predictions are not scored
    ambiguous: List[str] = field(default_factory=list)  # names that two labels of one side share after
    #   normalising; the lowest id is used

    def map_labels(self, labels: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        """Model label ids (N,) -> (dataset category ids (n,), keep (N,) bool): predictions of labels the dataset
        lacks are dropped."""
        labels = np.asarray(labels).reshape(-1).astype(np.int64)  # (N,)
        keep = np.array([int(v) in self.model_to_dataset for v in labels], dtype=bool)  # (N,)
        mapped = np.array([self.model_to_dataset[int(v)] for v in labels[keep]], dtype=np.int64)  # (n,)
        return mapped, keep


def normalize_name(name: str) -> str:
    """A class name as compared across label sets: case-folded, without whitespace, '_' or '-', so "Dining
    table", "dining_table" and "diningtable" (VOC's spelling) are one name."""
    return "".join(ch for ch in str(name).casefold() if not ch.isspace() and ch not in "_-")


def match_categories(categories: Sequence[Tuple[int, str]], model_names: Sequence[str]) -> CategoryMatch:
    """Dataset categories (id, name) -> the model's label ids, by name (see normalize_name). `model_names[i]` is
    the name of model label i (torchvision: `weights.meta["categories"]`, whose 'N/A' and '__background__' slots
    are placeholders, never matched nor reported)."""
    model_ids: Dict[str, int] = {}
    ambiguous = []
    for label, name in enumerate(model_names):
        key = normalize_name(name)
        if not key or str(name).strip().casefold() in PLACEHOLDER_NAMES:
            continue
        if key in model_ids:
            ambiguous.append(f"model labels {model_ids[key]} and {label} are both {name!r}")
            continue
        model_ids[key] = label
    dataset_ids: Dict[str, int] = {}
    for cid, name in sorted((int(c), str(n)) for c, n in categories):
        key = normalize_name(name)
        if key in dataset_ids:
            ambiguous.append(f"dataset categories {dataset_ids[key]} and {cid} are both {name!r}")
            continue
        dataset_ids[key] = cid
    mapping = {model_ids[k]: dataset_ids[k] for k in model_ids if k in dataset_ids}
    unmatched_dataset = [str(n) for c, n in categories if normalize_name(n) not in model_ids]
    unmatched_model = [str(model_names[i]) for k, i in model_ids.items() if k not in dataset_ids]
    return CategoryMatch(dict(sorted(mapping.items())), unmatched_dataset, unmatched_model, ambiguous)
