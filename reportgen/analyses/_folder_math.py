"""FiftyOne Brain's per-image scores (hardness, mistakenness, uniqueness) and the blockwise nearest-neighbour
distances uniqueness needs, so no N x N matrix is ever held.

Definitions (FiftyOne Brain, compute_hardness / compute_mistakenness / compute_uniqueness):
- hardness = the entropy (natural log) of the image's class probabilities, the row renormalised to sum 1 first as
  scipy.stats.entropy does; 0 log 0 = 0.
- mistakenness = (m * exp(-hardness) + 1) / 2, m = +1 when the prediction is wrong, -1 when right: near 1 for a
  confident mistake, near 0 for a confident right answer, 0.5 when the model has no idea.
- uniqueness: the Euclidean distances d1 <= d2 <= d3 to an image's 3 nearest other images in the embedding,
  mean(0.6 d1, 0.3 d2, 0.1 d3), divided by the largest such value in the folder (so in [0, 1]; every image 1 when
  there are 3 images or fewer, as FiftyOne returns; every image 0 when all are identical).
"""
from __future__ import annotations

from typing import Callable, Optional

import numpy as np
import torch

CHUNK_ROWS = 8192  # stored rows compared with a block of queries at once: (block, chunk) distances in memory
CANDIDATES = 4  # this many x k closest by the fast formula are measured again exactly
UNIQUENESS_WEIGHTS = (0.6, 0.3, 0.1)  # FiftyOne's weights of the 1st, 2nd and 3rd nearest neighbour's distance


def entropy(probs: np.ndarray) -> np.ndarray:
    """(n, K) probabilities -> (n,) natural-log entropy of each row (renormalised to sum 1; 0 log 0 = 0)."""
    p = np.asarray(probs, dtype=np.float64)
    p = p / p.sum(axis=1, keepdims=True)
    logs = np.log(np.where(p > 0, p, 1.0))  # (n, K): 0 where p == 0
    return -(p * logs).sum(axis=1)


def mistakenness(hardness: np.ndarray, wrong: np.ndarray) -> np.ndarray:
    """(n,) entropies and (n,) wrong-prediction flags -> (n,) FiftyOne mistakenness (m = +1 wrong, -1 right)."""
    m = np.where(wrong, 1.0, -1.0)
    return (m * np.exp(-np.asarray(hardness, dtype=np.float64)) + 1.0) / 2.0


def uniqueness(distances: np.ndarray) -> np.ndarray:
    """(n, 3) distances to the 3 nearest other images (ascending) -> (n,) uniqueness in [0, 1]."""
    n = len(distances)
    if n <= len(UNIQUENESS_WEIGHTS):
        return np.ones(n)
    score = (np.asarray(distances, dtype=np.float64) * np.asarray(UNIQUENESS_WEIGHTS)).mean(axis=1)  # (n,)
    top = score.max()
    return score / top if top > 0 else np.zeros(n)


def nearest_distances(read: Callable[[int, int], np.ndarray], rows: np.ndarray, k: int, device: torch.device,
                      centre: Optional[np.ndarray] = None, block_size: int = 1024,
                      chunk_rows: int = CHUNK_ROWS) -> np.ndarray:
    """For each of `rows` (m,) of the stored features: the Euclidean distances to its `k` nearest other `rows`,
    ascending, (m, k) float64 (inf where fewer than k others exist).

    `read(start, stop)` gives stored rows [start, stop) as (n, D) floats. Queries go in blocks of `block_size`
    against the others in chunks of `chunk_rows`: memory block x chunk, never m x m. The search ranks by
    |a|^2 + |b|^2 - 2 a.b of the rows minus `centre` (their mean, say: distances do not change, rounding shrinks)
    with one float32 matrix product on `device`, keeping a running CANDIDATES x k closest per query. That form
    still loses ~1% to cancellation on near neighbours far from the centre, so at the end of each block the
    candidates' distances are measured again as |a - b| in float64 (CPU) and the k smallest kept: exact unless
    rounding pushed a true neighbour out of the candidates."""
    rows = np.asarray(rows, dtype=np.int64)
    out = np.full((len(rows), k), np.inf)
    if len(rows) < 2 or k == 0:
        return out
    shift = np.zeros(1, dtype=np.float64) if centre is None else np.asarray(centre, dtype=np.float64)

    def approximate(positions: np.ndarray) -> torch.Tensor:
        return torch.from_numpy((gather_rows(read, rows, positions) - shift).astype(np.float32)).to(device)  # (n, D)

    keep = min(CANDIDATES * k, len(rows) - 1)
    for q0 in range(0, len(rows), block_size):
        block = np.arange(q0, min(q0 + block_size, len(rows)))
        queries = approximate(block)  # (b, D)
        best = torch.empty((len(block), 0), device=device)  # (b, <= keep) |key|^2 - 2 query.key, ascending
        best_at = torch.empty((len(block), 0), dtype=torch.long, device=device)  # their positions in `rows`
        for c0 in range(0, len(rows), chunk_rows):
            keys = approximate(np.arange(c0, min(c0 + chunk_rows, len(rows))))  # (c, D)
            # |q - k|^2 less |q|^2, which is the same for every key of a query and so leaves its order alone
            partial = torch.addmm((keys * keys).sum(dim=1)[None, :], queries, keys.T, alpha=-2.0)  # (b, c)
            own = np.arange(max(q0, c0), min(q0 + len(block), c0 + len(keys)))  # queries that are keys here
            if len(own):
                partial[torch.as_tensor(own - q0), torch.as_tensor(own - c0)] = float("inf")
            values, columns = partial.topk(min(keep, partial.shape[1]), dim=1, largest=False)  # (b, <= keep)
            merged, merged_at = torch.cat([best, values], dim=1), torch.cat([best_at, columns + c0], dim=1)
            best, order = merged.topk(min(keep, merged.shape[1]), dim=1, largest=False)
            best_at = merged_at.gather(1, order)
        candidates = best_at.cpu().numpy()  # (b, keep)
        exact = _exact_distances(read, rows, block, candidates)  # (b, keep)
        exact[~np.isfinite(best.cpu().numpy())] = np.inf  # a query's own row, picked when nothing else is left
        top = np.sort(exact, axis=1)[:, :k]
        out[q0:q0 + len(block), :top.shape[1]] = top
    return out


def gather_rows(read: Callable[[int, int], np.ndarray], rows: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """(n, D) stored rows rows[positions] (positions ascending), read in ranges spanning at most CHUNK_ROWS rows
    (so a sparse pick over a large folder never reads it whole)."""
    stored = rows[positions]
    pieces = []
    i = 0
    while i < len(stored):
        j = int(np.searchsorted(stored, stored[i] + CHUNK_ROWS, side="left"))
        block = read(int(stored[i]), int(stored[j - 1]) + 1)
        pieces.append(np.asarray(block)[stored[i:j] - stored[i]])
        i = j
    return np.concatenate(pieces)


def _exact_distances(read: Callable[[int, int], np.ndarray], rows: np.ndarray, block: np.ndarray,
                     candidates: np.ndarray, step: int = 128) -> np.ndarray:
    """(b,) query positions in `rows` and (b, c) candidate positions -> (b, c) float64 |query - candidate|, from
    the stored values (memory: the unique candidates' rows, stored dtype, and step x c x D float64)."""
    wanted = np.unique(np.concatenate([block, candidates.ravel()]))  # ascending positions
    features = gather_rows(read, rows, wanted)  # (u, D)
    queries = np.searchsorted(wanted, block)  # (b,) rows of `features`
    where = np.searchsorted(wanted, candidates)  # (b, c)
    out = np.empty(candidates.shape)
    for q0 in range(0, len(block), step):
        mine = features[queries[q0:q0 + step]].astype(np.float64)[:, None, :]  # (s, 1, D)
        out[q0:q0 + step] = np.linalg.norm(mine - features[where[q0:q0 + step]].astype(np.float64), axis=2)
    return out
