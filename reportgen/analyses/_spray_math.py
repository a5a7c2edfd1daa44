"""The spectral clustering of SpRAy (Lapuschkin et al. 2019, "Unmasking Clever Hans predictors"), for `strategies`.

Per class: maps average-pooled to at most side x side and normalised to sum 1 (`prepare_maps`); a symmetric k-NN
graph on their Euclidean distances, binary edges, i ~ j when either is among the other's k nearest (`knn_graph`);
the normalised Laplacian L = I - D^-1/2 A D^-1/2, whose smallest eigenvalues are the largest of D^-1/2 A D^-1/2
(`laplacian_spectrum`: dense `numpy.linalg.eigh` for small classes, `scipy.sparse.linalg.eigsh` otherwise);
the cluster count c in [2, max_clusters] where the eigengap lambda_(c+1) - lambda_c is largest (`eigengap_count`);
k-means on the first c eigenvectors, each row scaled to unit length (Ng, Jordan & Weiss 2001; `kmeans`).

Everything is seeded and ties go to the lower index, so a class's clusters do not depend on batches or shards.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

DENSE_LIMIT = 200  # classes up to this many images use a dense eigendecomposition (eigsh is faster beyond)
KNN_BLOCK = 1024  # query rows whose distances to every map are held at once (1024 x n floats)


@dataclass
class SpectralResult:
    """One class's clustering."""

    labels: np.ndarray  # (n,) cluster per map, 0 = the largest cluster (ties: the one whose first map comes first)
    eigenvalues: np.ndarray  # (m,) smallest eigenvalues of the normalised Laplacian, ascending, m <= max_clusters + 1
    clusters: int  # c, from the largest eigengap
    gap: float  # lambda_(c+1) - lambda_c
    k: int  # neighbours used (k clamped to n - 1)
    solver: str  # "dense eigh" | "eigsh"


def prepare_maps(cams: np.ndarray, side: int) -> Tuple[np.ndarray, np.ndarray]:
    """(n, h, w) raw maps -> ((n, h', w') maps average-pooled to at most side x side, each summing to 1; (n,) True
    where the map had no positive mass (all zero, or not finite) and was made uniform)."""
    maps = torch.nan_to_num(torch.as_tensor(np.asarray(cams), dtype=torch.float32), nan=0.0, posinf=0.0,
                            neginf=0.0).clamp_min(0)  # (n, h, w)
    height, width = maps.shape[1:]
    size = (min(height, side), min(width, side))
    if size != (height, width):
        maps = F.adaptive_avg_pool2d(maps[:, None], size)[:, 0]  # (n, h', w')
    maps = maps.double()
    total = maps.sum(dim=(1, 2), keepdim=True)  # (n, 1, 1)
    empty = total[:, 0, 0] <= 0
    uniform = torch.full_like(maps, 1.0 / (size[0] * size[1]))
    maps = torch.where(empty[:, None, None], uniform, maps / total.clamp_min(1e-300))
    return maps.numpy(), empty.numpy()


def knn_graph(points: np.ndarray, k: int) -> np.ndarray:
    """(n, d) points -> (n, k) indices of each point's k nearest others by Euclidean distance (equal distances: the
    lower index first; a point is never its own neighbour, an identical other point may be)."""
    points = np.asarray(points, dtype=np.float64)
    n = len(points)
    squares = (points ** 2).sum(axis=1)  # (n,)
    out = np.empty((n, k), dtype=np.int64)
    for start in range(0, n, KNN_BLOCK):
        stop = min(start + KNN_BLOCK, n)
        distances = squares[start:stop, None] + squares[None, :] - 2.0 * points[start:stop] @ points.T  # (b, n)
        np.maximum(distances, 0.0, out=distances)
        distances[np.arange(stop - start), np.arange(start, stop)] = np.inf  # never itself
        out[start:stop] = _nearest_k(distances, k)
    return out


def _nearest_k(distances: np.ndarray, k: int) -> np.ndarray:
    """(b, n) distances -> (b, k) column indices of the k smallest per row, nearest first, equal distances in
    column order: what a stable full argsort gives, from a partition (most rows have exactly k candidates)."""
    kth = np.partition(distances, k - 1, axis=1)[:, k - 1:k]  # (b, 1) the k-th smallest distance
    candidates = distances <= kth  # (b, n), k per row unless distances tie at the k-th
    plain = candidates.sum(axis=1) == k
    out = np.empty((len(distances), k), dtype=np.int64)
    columns = np.nonzero(candidates[plain])[1].reshape(-1, k)  # (p, k) ascending column order
    order = np.argsort(np.take_along_axis(distances[plain], columns, axis=1), axis=1, kind="stable")
    out[plain] = np.take_along_axis(columns, order, axis=1)
    for row in np.flatnonzero(~plain):  # ties at the k-th distance
        columns = np.flatnonzero(candidates[row])
        out[row] = columns[np.argsort(distances[row, columns], kind="stable")[:k]]
    return out


def adjacency_edges(neighbours: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """(n, k) neighbour indices -> (rows, cols) of the symmetric binary adjacency: i ~ j when j is among i's k
    nearest or i among j's; each undirected edge listed both ways, once."""
    n, k = neighbours.shape
    rows = np.repeat(np.arange(n), k)
    cols = neighbours.ravel()
    keys = np.unique(np.concatenate([rows * n + cols, cols * n + rows]))
    return keys // n, keys % n


def laplacian_spectrum(neighbours: np.ndarray, count: int, seed: int, dense_limit: int = DENSE_LIMIT
                       ) -> Tuple[np.ndarray, np.ndarray, str]:
    """The `count` smallest eigenvalues (ascending, (count,)) of the normalised Laplacian of the k-NN graph and
    their eigenvectors ((n, count)), and the solver used."""
    n = len(neighbours)
    rows, cols = adjacency_edges(neighbours)
    degree = np.bincount(rows, minlength=n).astype(np.float64)  # (n,), >= k >= 1
    scale = 1.0 / np.sqrt(degree)
    weights = scale[rows] * scale[cols]  # entries of D^-1/2 A D^-1/2
    count = min(count, n)
    if n > dense_limit and count < n - 1:
        try:
            from scipy.sparse import csr_matrix
            from scipy.sparse.linalg import ArpackNoConvergence, eigsh
        except ImportError:  # no scipy: the dense path below, slower on large classes
            pass
        else:
            matrix = csr_matrix((weights, (rows, cols)), shape=(n, n))
            start = np.random.default_rng(seed).standard_normal(n)
            try:
                values, vectors = eigsh(matrix, k=count, which="LA", v0=start)  # the largest of D^-1/2 A D^-1/2
            except ArpackNoConvergence:
                pass
            else:
                order = np.argsort(-values, kind="stable")
                return 1.0 - values[order], vectors[:, order], "eigsh"
    matrix = np.zeros((n, n))
    matrix[rows, cols] = weights
    values, vectors = np.linalg.eigh(np.eye(n) - matrix)  # ascending
    return values[:count], vectors[:, :count], "dense eigh"


def eigengap_count(eigenvalues: np.ndarray, max_clusters: int) -> Tuple[int, float]:
    """(c, gap): c in [2, max_clusters] where lambda_(c+1) - lambda_c is largest (ties: the smaller c), eigenvalues
    ascending and 1-indexed as in the formula. With fewer than 3 eigenvalues: (2, 0.0)."""
    values = np.asarray(eigenvalues, dtype=np.float64)
    top = min(max_clusters, len(values) - 1)
    if top < 2:
        return 2, 0.0
    gaps = values[2: top + 1] - values[1:top]  # gaps[j] = lambda_(j+3) - lambda_(j+2): c = j + 2
    best = int(np.argmax(gaps))
    return best + 2, float(gaps[best])


def kmeans(points: np.ndarray, clusters: int, seed: int, restarts: int = 10, iterations: int = 300
           ) -> np.ndarray:
    """(n, d) points -> (n,) cluster per point: Lloyd's k-means from k-means++ starts, the run with the lowest
    within-cluster sum of squares of `restarts` (ties: the earlier run). A cluster left empty takes the point
    farthest from its centre."""
    points = np.asarray(points, dtype=np.float64)
    rng = np.random.default_rng(seed)
    best_labels: Optional[np.ndarray] = None
    best_inertia = np.inf
    for _ in range(restarts):
        centres = _kmeans_plus_plus(points, clusters, rng)
        labels = np.zeros(len(points), dtype=np.int64)
        for _ in range(iterations):
            distances = ((points[:, None, :] - centres[None]) ** 2).sum(axis=2)  # (n, c)
            labels = distances.argmin(axis=1)
            own = distances[np.arange(len(points)), labels]  # (n,) each point's distance to its centre
            moved = centres.copy()
            for j in range(clusters):
                members = labels == j
                if members.any():
                    moved[j] = points[members].mean(axis=0)
                else:
                    far = int(own.argmax())
                    moved[j], labels[far], own[far] = points[far], j, -1.0
            if np.allclose(moved, centres, rtol=0.0, atol=1e-12):
                break
            centres = moved
        distances = ((points[:, None, :] - centres[None]) ** 2).sum(axis=2)
        labels = distances.argmin(axis=1)
        inertia = float(distances[np.arange(len(points)), labels].sum())
        if inertia < best_inertia - 1e-12:
            best_labels, best_inertia = labels, inertia
    return best_labels


def _kmeans_plus_plus(points: np.ndarray, clusters: int, rng: np.random.Generator) -> np.ndarray:
    """(clusters, d) starting centres: the first uniformly, each next with probability proportional to the squared
    distance to the nearest centre so far (uniformly when every point sits on a centre)."""
    n = len(points)
    centres = [points[rng.integers(n)]]
    nearest = ((points - centres[0]) ** 2).sum(axis=1)  # (n,)
    for _ in range(1, clusters):
        total = nearest.sum()
        pick = rng.choice(n, p=nearest / total) if total > 0 else int(rng.integers(n))
        centres.append(points[pick])
        nearest = np.minimum(nearest, ((points - points[pick]) ** 2).sum(axis=1))
    return np.array(centres)


def order_clusters(labels: np.ndarray) -> np.ndarray:
    """Relabel clusters 0, 1, ... by size, largest first (equal sizes: the one whose first member comes first)."""
    found = np.unique(labels)
    sizes = np.array([(labels == c).sum() for c in found])
    firsts = np.array([np.flatnonzero(labels == c)[0] for c in found])
    order = np.lexsort((firsts, -sizes))
    mapping = np.empty(int(found.max()) + 1, dtype=np.int64)
    mapping[found[order]] = np.arange(len(found))
    return mapping[labels]


def spectral_clusters(maps: np.ndarray, k: int, max_clusters: int, seed: int, dense_limit: int = DENSE_LIMIT
                      ) -> SpectralResult:
    """(n, h, w) or (n, d) maps, already normalised (`prepare_maps`), n >= 3 -> SpRAy's clusters."""
    points = np.asarray(maps, dtype=np.float64).reshape(len(maps), -1)  # (n, d)
    n = len(points)
    k_used = max(1, min(k, n - 1))
    neighbours = knn_graph(points, k_used)  # (n, k)
    values, vectors, solver = laplacian_spectrum(neighbours, max_clusters + 1, seed, dense_limit)
    clusters, gap = eigengap_count(values, max_clusters)
    clusters = min(clusters, n)
    embedding = vectors[:, :clusters]  # (n, c)
    norms = np.linalg.norm(embedding, axis=1, keepdims=True)
    embedding = embedding / np.where(norms > 0, norms, 1.0)
    labels = order_clusters(kmeans(embedding, clusters, seed))
    return SpectralResult(labels=labels, eigenvalues=values, clusters=int(labels.max()) + 1, gap=gap, k=k_used,
                          solver=solver)
