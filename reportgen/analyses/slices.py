"""`slices`: coherent groups of images where the model fails most (Domino-style error slices), and FiftyOne Brain's
per-image hardness, mistakenness and uniqueness.

Error slices (after Domino, Eyuboglu et al. 2022): every labelled image (folder matching a model class, finite
probabilities, penultimate features) becomes one row of
  [PCA of its features to `pca_dims` (scaled so a dimension has variance 1 on average),
   label_weight x one-hot of its label, prediction_weight x one-hot of its top-1 prediction]
(one-hot over the `max_classes` classes most frequent among labels and predictions, the rest sharing one column).
A Gaussian mixture (scikit-learn, diagonal covariances, `components` of them or fewer for a small folder: at most
one per `min_size` images; fixed seed) is fitted on at most `fit_sample` of those rows (a seeded sample; the PCA on
the same sample) and every row is assigned to its most likely component. Components with at least `min_size`
images and one error are ranked by error rate (top-1 wrong), then by the mean gap 1 - p(label); the top `slices`
are reported with their dominant labels and predictions and a gallery (wrong images first, most typical first).
Because label and prediction are part of the rows, a component tends to hold one (label, prediction) pair: a
slice reads as "these images of X, which look alike, are taken for Y".

Per-image scores (reportgen/analyses/_folder_math.py): hardness = entropy of the probabilities; mistakenness =
(m e^-hardness + 1) / 2, m = +1 wrong, -1 right (empty without a matching label); uniqueness from the Euclidean
distances to the 3 nearest other images in the penultimate features (0.6 / 0.3 / 0.1, divided by the folder's
largest), searched blockwise (no N x N matrix).

Inputs: the predictions analysis's results (predictions.csv, probabilities.npy) and the activations analysis's
embedding (embeddings.npz), read after both finalized (`reads`); no state of its own, so shards merge for free.
Without activations the section still gives hardness and mistakenness. A multi-label head gets one line saying why
not. Results: `results/slices.json`, `results/image_scores.csv` (path, hardness, mistakenness, uniqueness,
component: the image's mixture component, empty outside the mixture).
"""
from __future__ import annotations

import csv
import io
import shutil
from collections import Counter
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from reportgen.analyses._folder_inputs import (FolderPredictions, copy_embeddings, placeholder, require,
                                               single_label_predictions)
from reportgen.analyses._redecode import decode_thumbnail
from reportgen.analyses._folder_math import entropy, gather_rows, mistakenness, nearest_distances, uniqueness
from reportgen.analyses.base import Analysis, RunContext, register
from reportgen.errors import ConfigError
from reportgen.inputs.labels import folder_display_names
from reportgen.report import plots
from reportgen.report.elements import Alert, Gallery, GalleryItem, KeyValues, Section, Table, Text
from reportgen.state.files import write_atomic_with, write_json
from reportgen.state.streams import COPY_ROWS, RowFile

SCORES_HEADER = ["path", "hardness", "mistakenness", "uniqueness", "component"]
NEIGHBOURS = 3  # uniqueness: FiftyOne's 3 nearest neighbours
REG_COVAR = 1e-3  # added to each variance: a component pure in one label has no variance on its one-hot column
DOMINANT = 3  # labels and predictions listed per slice


@dataclass
class SlicesConfig:
    components: int = 25  # mixture components (Domino: 25); at most one per min_size images of a small folder
    pca_dims: int = 32  # the penultimate features are reduced to this many principal components first
    label_weight: float = 1.0  # scale of the one-hot label columns (the reduced features have variance ~1 each)
    prediction_weight: float = 1.0  # scale of the one-hot prediction columns
    max_classes: int = 50  # one-hot columns for at most this many classes (most frequent), the rest share one
    slices: int = 5  # groups reported, highest error rate first
    min_size: int = 5  # a reported group holds at least this many images
    gallery: int = 8  # images drawn per group
    fit_sample: int = 10000  # PCA and mixture are fitted on at most this many images (memory: fit_sample x D)
    seed: int = 0  # the sample's and the mixture's seed
    block_size: int = 1024  # uniqueness: query images per block of the nearest-neighbour search


@dataclass
class _Mixture:
    """The fitted mixture's view of the folder."""

    rows: np.ndarray  # (n,) rows of predictions.csv in the mixture
    component: np.ndarray  # (n,) each row's component
    typicality: np.ndarray  # (n,) the probability of that component given the row
    points: np.ndarray  # (n, d) the reduced, scaled features
    components: int
    fitted_on: int  # rows the PCA and mixture were fitted on
    dims: int  # PCA dimensions kept


@register("slices")
class Slices(Analysis):
    Config = SlicesConfig
    title = "Error slices"
    tasks = frozenset({"classification"})
    why_not = "they output no class predictions to be wrong about"
    reads = ("predictions", "activations")

    @classmethod
    def check_config(cls, cfg: Any) -> None:
        for key, low in (("components", 1), ("pca_dims", 1), ("max_classes", 1), ("slices", 0), ("min_size", 1),
                         ("gallery", 0), ("fit_sample", 2), ("block_size", 1)):
            if int(getattr(cfg, key)) < low:
                raise ConfigError(f"analysis.slices.{key}", getattr(cfg, key), f"an integer >= {low}")
        for key in ("label_weight", "prediction_weight"):
            if not float(getattr(cfg, key)) >= 0:
                raise ConfigError(f"analysis.slices.{key}", getattr(cfg, key), "a weight >= 0")
        require("sklearn", "slices", "the error-slice mixture (scikit-learn)")

    def __init__(self, cfg: Any, ctx: RunContext):
        super().__init__(cfg, ctx)
        self.check_config(cfg)

    def finalize(self) -> Optional[Section]:
        section = Section(id="slices", title=self.title)
        data, instead = single_label_predictions(self.ctx, "error slices",
                                                 "hardness, mistakenness and a top-1 error need")
        if data is None:
            section.elements.append(Text(instead))
            return section
        finite, hardness, gap = self._probability_scores(data)
        evaluated = finite & (data.targets >= 0)  # (N,) labelled, matching a column, finite probabilities
        wrong = evaluated & (data.top1 != data.targets)  # (N,)
        mistaken = np.full(len(data.paths), np.nan)
        mistaken[evaluated] = mistakenness(hardness[evaluated], wrong[evaluated])
        unique = np.full(len(data.paths), np.nan)
        mixture: Optional[_Mixture] = None
        folder = self.ctx.results_dir / ".slices"
        features = None
        try:
            features, has, note = copy_embeddings(self.ctx, data.paths, folder)
            if features is not None:
                has &= self._finite_rows(features)
                mean = self._mean(features, has)  # (D,) float64
                pool = np.flatnonzero(has)
                unique[pool] = uniqueness(nearest_distances(features.read, pool, NEIGHBOURS, self.ctx.device,
                                                            centre=mean, block_size=int(self.cfg.block_size)))
                read = lambda a, b: features.read(a, b) - mean  # noqa: E731  centred float64 rows
                mixture, note = self._fit(data, read, features.shape[1], evaluated & has)
        finally:
            if features is not None:
                features.handle.close()
            shutil.rmtree(folder, ignore_errors=True)
        component = np.full(len(data.paths), -1, dtype=np.int64)
        if mixture is not None:
            component[mixture.rows] = mixture.component
        self._write_scores(data, hardness, mistaken, unique, component)
        ranked = self._rank(mixture, wrong, gap) if mixture is not None else []
        totals = self._totals(data, mixture, ranked, evaluated, wrong, gap, note)
        write_json(self.ctx.results_dir / "slices.json", totals)
        self._describe(section, data, totals, mixture, wrong, mistaken, unique, note)
        return section

    # --- the scores and the mixture ----------------------------------------------------------------------------

    @staticmethod
    def _probability_scores(data: FolderPredictions) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(N,) finite probabilities, hardness (NaN where not finite) and gap 1 - p(label) (NaN without a label)."""
        finite = np.ones(len(data.paths), dtype=bool)  # (N,)
        hardness = np.full(len(data.paths), np.nan)  # (N,)
        gap = np.full(len(data.paths), np.nan)  # (N,)
        for start, stop, probs in data.chunks():
            finite[start:stop] = np.isfinite(probs).all(axis=1)
            ok = finite[start:stop]
            hardness[start:stop][ok] = entropy(probs[ok])
            targets = data.targets[start:stop]
            labelled = ok & (targets >= 0)
            gap[start:stop][labelled] = 1.0 - probs[labelled, targets[labelled]]
        return finite, hardness, gap

    @staticmethod
    def _finite_rows(features: RowFile) -> np.ndarray:
        finite = np.zeros(features.shape[0], dtype=bool)
        for start in range(0, features.shape[0], COPY_ROWS):
            stop = min(start + COPY_ROWS, features.shape[0])
            finite[start:stop] = np.isfinite(features.read(start, stop)).all(axis=1)
        return finite

    @staticmethod
    def _mean(features: RowFile, rows: np.ndarray) -> np.ndarray:
        """(D,) float64 mean of the chosen rows."""
        total = np.zeros(features.shape[1])
        for start in range(0, features.shape[0], COPY_ROWS):
            stop = min(start + COPY_ROWS, features.shape[0])
            total += features.read(start, stop)[rows[start:stop]].sum(axis=0, dtype=np.float64)
        return total / max(int(rows.sum()), 1)

    def _fit(self, data: FolderPredictions, read, dim: int, domain: np.ndarray) -> Tuple[Optional[_Mixture], str]:
        """PCA + Gaussian mixture over the labelled rows with features (module docstring); None and why when the
        folder is too small."""
        from sklearn.decomposition import PCA
        from sklearn.mixture import GaussianMixture

        cfg = self.cfg
        rows = np.flatnonzero(domain)  # (n,)
        count = min(int(cfg.components), len(rows) // int(cfg.min_size))
        if not len(rows):
            return None, ("no image has both a folder class matching a model class and features, so there are no "
                          "errors to group")
        if count < 1 or len(rows) < 2:
            return None, (f"{len(rows)} labelled images with features: too few for a group of {cfg.min_size} "
                          f"(analysis.slices.min_size)")
        rng = np.random.default_rng(int(cfg.seed))
        sample = np.sort(rng.choice(len(rows), int(cfg.fit_sample), replace=False)) if len(rows) > int(
            cfg.fit_sample) else np.arange(len(rows))  # positions in `rows`
        fitted = gather_rows(read, rows, sample)  # (s, D)
        count = min(count, len(sample))  # a mixture needs at least as many images as components
        dims = max(1, min(int(cfg.pca_dims), dim, len(sample) - 1))
        pca = PCA(n_components=dims, svd_solver="full" if len(sample) * dim <= 1 << 22 else "randomized",
                  random_state=int(cfg.seed)).fit(fitted)
        scale = float(np.sqrt(np.mean(pca.explained_variance_)))
        scale = scale if scale > 0 else 1.0
        points = np.empty((len(rows), dims), dtype=np.float64)  # (n, d)
        for first in range(0, len(rows), COPY_ROWS):
            part = np.arange(first, min(first + COPY_ROWS, len(rows)))
            points[part] = pca.transform(gather_rows(read, rows, part)) / scale
        rows_x = np.concatenate([points, self._one_hot(data, rows)], axis=1)  # (n, d + 2 (c + 1))
        mixture = GaussianMixture(n_components=count, covariance_type="diag", reg_covar=REG_COVAR,
                                  random_state=int(cfg.seed), max_iter=200).fit(rows_x[sample])
        responsibility = mixture.predict_proba(rows_x)  # (n, count)
        component = responsibility.argmax(axis=1)
        return _Mixture(rows, component, responsibility[np.arange(len(rows)), component], points, count,
                        len(sample), dims), ""

    def _one_hot(self, data: FolderPredictions, rows: np.ndarray) -> np.ndarray:
        """(n, 2 (c + 1)) weighted one-hot label and prediction over the most frequent classes (+ 'other')."""
        targets, top1 = data.targets[rows], data.top1[rows]
        counts = Counter(targets.tolist()) + Counter(top1.tolist())
        kept = [c for c, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[: int(self.cfg.max_classes)]]
        position = {c: i for i, c in enumerate(kept)}
        out = np.zeros((len(rows), 2 * (len(kept) + 1)))
        width = len(kept) + 1
        for block, values, weight in ((0, targets, float(self.cfg.label_weight)),
                                      (width, top1, float(self.cfg.prediction_weight))):
            columns = np.array([position.get(int(v), len(kept)) for v in values], dtype=np.int64)
            out[np.arange(len(rows)), block + columns] = weight
        return out

    def _rank(self, mixture: _Mixture, wrong: np.ndarray, gap: np.ndarray) -> List[int]:
        """Components with >= min_size images and an error, by error rate, mean gap, size (then number)."""
        keys = []
        for c in range(mixture.components):
            members = mixture.rows[mixture.component == c]
            errors = int(wrong[members].sum())
            if len(members) >= int(self.cfg.min_size) and errors:
                keys.append((-errors / len(members), -float(gap[members].mean()), -len(members), c))
        return [c for *_, c in sorted(keys)][: int(self.cfg.slices)]

    # --- results -----------------------------------------------------------------------------------------------

    def _write_scores(self, data: FolderPredictions, hardness: np.ndarray, mistaken: np.ndarray,
                      unique: np.ndarray, component: np.ndarray) -> None:
        def cell(value: float) -> str:
            return f"{value:.6f}" if np.isfinite(value) else ""

        def write(handle: Any) -> None:  # streamed in pieces of COPY_ROWS rows: no whole file in memory
            buffer = io.StringIO()
            writer = csv.writer(buffer)
            writer.writerow(SCORES_HEADER)
            for row, path in enumerate(data.paths):
                writer.writerow([path, cell(hardness[row]), cell(mistaken[row]), cell(unique[row]),
                                 int(component[row]) if component[row] >= 0 else ""])
                if (row + 1) % COPY_ROWS == 0 or row + 1 == len(data.paths):
                    handle.write(buffer.getvalue().encode("utf-8"))
                    buffer.seek(0)
                    buffer.truncate()
            if not data.paths:
                handle.write(buffer.getvalue().encode("utf-8"))

        write_atomic_with(self.ctx.results_dir / "image_scores.csv", write, "image_scores.csv")

    def _totals(self, data: FolderPredictions, mixture: Optional[_Mixture], ranked: List[int],
                evaluated: np.ndarray, wrong: np.ndarray, gap: np.ndarray, note: str) -> Dict[str, Any]:
        """slices.json: the mixture's settings, every component's size and error rate, the reported slices."""
        classes = self.ctx.dataset_classes
        totals: Dict[str, Any] = {
            "images": len(data.paths), "evaluated": int(evaluated.sum()),
            "error_rate": float(wrong.sum() / evaluated.sum()) if evaluated.any() else None,
            "mixture": None, "components": [], "slices": [], "note": note or None}
        if mixture is None:
            return totals
        totals["mixture"] = {"components": mixture.components, "pca_dims": mixture.dims,
                             "fitted_on": mixture.fitted_on, "images": len(mixture.rows),
                             "label_weight": float(self.cfg.label_weight),
                             "prediction_weight": float(self.cfg.prediction_weight), "seed": int(self.cfg.seed)}
        for c in range(mixture.components):
            members = mixture.rows[mixture.component == c]
            totals["components"].append({"component": c, "images": len(members), "errors": int(wrong[members].sum()),
                                         "error_rate": float(wrong[members].mean()) if len(members) else None})
        for rank, c in enumerate(ranked, start=1):
            inside = mixture.component == c
            members = mixture.rows[inside]
            order = np.lexsort((members, -mixture.typicality[inside], ~wrong[members]))  # wrong, typical, file
            labels = Counter(classes[int(data.labels[r])] for r in members)
            predicted = Counter(data.names[int(data.top1[r])] for r in members)
            totals["slices"].append({
                "rank": rank, "component": c, "images": len(members), "errors": int(wrong[members].sum()),
                "error_rate": float(wrong[members].mean()),
                "mean_gap": float(gap[members].mean()),
                "labels": [{"class": k, "share": v / len(members)} for k, v in labels.most_common(DOMINANT)],
                "predictions": [{"class": k, "share": v / len(members)} for k, v in predicted.most_common(DOMINANT)],
                "examples": [data.paths[int(r)] for r in members[order][: max(int(self.cfg.gallery), 0)]],
            })
        return totals

    def _describe(self, section: Section, data: FolderPredictions, totals: Dict[str, Any],
                  mixture: Optional[_Mixture], wrong: np.ndarray, mistaken: np.ndarray, unique: np.ndarray,
                  note: str) -> None:
        facts: List[Tuple[str, Any]] = [("images", totals["images"]), ("labelled (matching a model class)",
                                                                         totals["evaluated"])]
        if totals["error_rate"] is not None:
            facts.append(("top-1 error rate", f"{totals['error_rate']:.1%}"))
        if mixture is not None:
            m = totals["mixture"]
            facts.append(("mixture", f"{m['components']} Gaussian components over {m['pca_dims']} principal "
                                     f"components of the penultimate features + one-hot label and prediction, "
                                     f"fitted on {m['fitted_on']} of {m['images']} images"))
        section.elements.append(KeyValues(facts))
        if note:
            section.alerts.append(Alert("info", f"No error slices: {note}"))
        slices = totals["slices"]
        section.summary = (f"{len(slices)} error slice{'s' if len(slices) != 1 else ''}; worst: "
                           f"{slices[0]['error_rate']:.0%} wrong in "
                           f"{slices[0]['images']} images" if slices else "no error slice")
        if mixture is not None and not slices:
            section.elements.append(Text(f"No group of at least {self.cfg.min_size} images has an error."))
        shown = dict(zip(self.ctx.dataset_classes, folder_display_names(
            self.ctx.dataset_classes, self.ctx.loaded.class_names, self.ctx.loaded.synsets)))
        if slices:
            section.elements.append(Text(
                "Each slice is one component of a Gaussian mixture over the images' reduced features, labels and "
                "predictions: images that look alike to the model and share a label and a prediction. Slices are "
                "ranked by error rate; a slice made of one label and one wrong prediction is a failure mode to "
                "look at (a shade, a background, a viewpoint), not single noisy images."))
            section.elements.append(Table(
                ["slice", "images", "errors", "error rate", "mostly labelled", "mostly predicted"],
                [[s["rank"], s["images"], s["errors"], round(s["error_rate"], 4), _shares(s["labels"], shown),
                  _shares(s["predictions"], {})] for s in slices], caption="Error slices, highest error rate first"))
            if mixture.points.shape[1] >= 2:
                groups = np.full(len(mixture.rows), -1)
                for s in slices:
                    groups[mixture.component == s["component"]] = s["rank"] - 1
                section.elements.append(plots.embedding_scatter(
                    mixture.points[:, :2], groups, [f"slice {s['rank']}" for s in slices], name="slices",
                    xlabel="PC1", ylabel="PC2", legend_title="error slice", dpi=int(self.ctx.report.figure_dpi),
                    caption="The labelled images on the first two principal components of their features; the "
                            "reported slices coloured, every other image grey"))
            for s in slices:
                section.elements.append(self._gallery(s, data, wrong, shown))
        self._score_tables(section, data, mistaken, unique, shown)

    def _gallery(self, s: Dict[str, Any], data: FolderPredictions, wrong: np.ndarray, shown: Dict[str, str]
                 ) -> Gallery:
        row_of = {path: row for row, path in enumerate(data.paths)}
        items = []
        for path in s["examples"]:
            row = row_of[path]
            image = decode_thumbnail(self.ctx, path)
            lines = [f"label: {shown[self.ctx.dataset_classes[int(data.labels[row])]]}",
                     f"predicted: {data.names[int(data.top1[row])]}"]
            if image is None:
                lines.append("(could not be read again)")
            items.append(GalleryItem(image=image if image is not None else placeholder(self.ctx), title=path,
                                     lines=lines, status="bad" if wrong[row] else "ok"))
        return Gallery(title=f"Slice {s['rank']}: {s['error_rate']:.0%} wrong of {s['images']} images · mostly "
                             f"{_shares(s['labels'][:1], shown)} predicted {_shares(s['predictions'][:1], {})}",
                       items=items, note="wrong images first, then the most typical of the slice")

    def _score_tables(self, section: Section, data: FolderPredictions, mistaken: np.ndarray, unique: np.ndarray,
                      shown: Dict[str, str]) -> None:
        for title, values, column in (("Most likely mistaken", mistaken, "mistakenness"),
                                      ("Most unique", unique, "uniqueness")):
            rows = np.flatnonzero(np.isfinite(values))
            if not len(rows):
                continue
            top = rows[np.lexsort((rows, -values[rows]))][:10]
            section.elements.append(Table(
                ["path", "label", "predicted", column],
                [[data.paths[r], shown[self.ctx.dataset_classes[int(data.labels[r])]] if data.labels[r] >= 0 else "",
                  data.names[int(data.top1[r])], round(float(values[r]), 4)] for r in top],
                caption=f"{title} (FiftyOne Brain's {column}; every image in results/image_scores.csv)",
                csv="image_scores.csv"))


def _shares(entries: List[Dict[str, Any]], shown: Dict[str, str]) -> str:
    """'cat 80%, dog 20%'."""
    return ", ".join(f"{shown.get(e['class'], e['class'])} {e['share']:.0%}" for e in entries)
