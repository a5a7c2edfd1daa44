"""The k-NN search and vote of the `knn` analysis (DINO's eval_knn), blockwise so no N x N matrix is ever held.

Features are L2-normalised rows, so a dot product is the cosine similarity. `nearest_neighbours` takes a block of
queries at a time and runs over the stored rows in chunks, keeping each query's running top `kk`: per chunk the
similarities (block x chunk) are masked (rows outside the pool, the query itself) and reduced to their top `kk`,
then merged with the running ones. Order is (similarity descending, row ascending) everywhere, so equal
similarities (duplicate images) always resolve to the lower row, whatever the block and chunk sizes or device:
`topk` returns tied values in no set order, so its picks are re-sorted, and a row whose (k+1)-th value equals its
k-th (a tie that may have left equal columns out) is sorted in full (stable) instead. Stored features up to
CACHE_BYTES are read once and kept on the device; larger ones are read again, chunk by chunk, for every block.

`weighted_vote` is DINO's: each of the k neighbours adds exp(similarity / T) to its class. `rank_hits` ranks the
classes by that score (ties to the lower class index) and says whether the query's label is first / in the top 5.
"""
from __future__ import annotations

from typing import Callable, Iterator, List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

CHUNK_ROWS = 8192  # stored rows compared with a block of queries at once: (block, chunk) similarities in memory
CACHE_BYTES = 256 << 20  # stored features up to this size are read from disk once and kept on the device
VOTE_VALUES = 1 << 24  # one-hot values (queries x k x classes) the vote builds at once (64 MiB)


def unit_rows(features: torch.Tensor) -> torch.Tensor:
    """(B, D) features -> (B, D) L2-normalised rows (a zero row stays zero)."""
    return F.normalize(features.float(), dim=1)  # (B, D)


def nearest_neighbours(read: Callable[[int, int], np.ndarray], count: int, pool: np.ndarray, kk: int,
                       device: torch.device, block_size: int = 1024, chunk_rows: int = CHUNK_ROWS,
                       cache_bytes: int = CACHE_BYTES) -> Iterator[Tuple[int, int, torch.Tensor, torch.Tensor]]:
    """For every row (query) in blocks of `block_size`: its `kk` most similar pool rows other than itself.

    `read(start, stop)` gives rows [start, stop) of the (count, D) unit features (any float dtype), `pool` (count,)
    which rows may be neighbours. Yields (start, stop, similarities (b, kk) float32, rows (b, kk) int64) on
    `device`, best first; where fewer than `kk` pool rows exist the tail holds -inf and row -1."""
    pool = np.asarray(pool, dtype=bool)
    chunks = [(c0, min(c0 + chunk_rows, count)) for c0 in range(0, count, chunk_rows)]
    chunks = [(c0, c1) for c0, c1 in chunks if pool[c0:c1].any()]  # chunks without a pool row are never read
    outside = [None if pool[c0:c1].all() else torch.as_tensor(np.flatnonzero(~pool[c0:c1]), device=device)
               for c0, c1 in chunks]  # (m,) columns of each chunk that are not in the pool
    cached: Optional[List[torch.Tensor]] = None
    row_bytes = read(0, 1).shape[1] * 4 if count else 0
    if sum(c1 - c0 for c0, c1 in chunks) * row_bytes <= cache_bytes:
        cached = [_to_device(read(c0, c1), device) for c0, c1 in chunks]  # each (c, D)
    for q0 in range(0, count, block_size):
        q1 = min(q0 + block_size, count)
        queries = _to_device(read(q0, q1), device)  # (b, D)
        best_sims = torch.empty(q1 - q0, 0, device=device)  # (b, 0) -> (b, kk)
        best_rows = torch.empty(q1 - q0, 0, dtype=torch.long, device=device)
        for number, (c0, c1) in enumerate(chunks):
            keys = cached[number] if cached is not None else _to_device(read(c0, c1), device)  # (c, D)
            sims = queries @ keys.T  # (b, c)
            if outside[number] is not None:
                sims.index_fill_(1, outside[number], float("-inf"))  # rows outside the pool
            if max(q0, c0) < min(q1, c1):  # queries that are rows of this chunk: never their own neighbour
                own = torch.arange(max(q0, c0), min(q1, c1), device=device)  # (o,)
                sims[own - q0, own - c0] = float("-inf")
            chunk_sims, chunk_cols = _chunk_top(sims, kk)  # (b, <= kk)
            # the running rows are all below c0 and each part is (value desc, row asc): a stable sort keeps that
            merged_sims = torch.cat([best_sims, chunk_sims], dim=1)  # (b, <= 2kk)
            merged_rows = torch.cat([best_rows, chunk_cols + c0], dim=1)
            order = merged_sims.argsort(dim=1, descending=True, stable=True)[:, :kk]  # (b, <= kk)
            best_sims, best_rows = merged_sims.gather(1, order), merged_rows.gather(1, order)
        missing = kk - best_sims.shape[1]
        if missing > 0:
            best_sims = F.pad(best_sims, (0, missing), value=float("-inf"))  # (b, kk)
            best_rows = F.pad(best_rows, (0, missing), value=-1)
        best_rows = best_rows.masked_fill(torch.isinf(best_sims), -1)  # (b, kk)
        yield q0, q1, best_sims, best_rows


def _to_device(rows: np.ndarray, device: torch.device) -> torch.Tensor:
    """Rows read from disk (read-only, maybe float16) as a float32 tensor on `device`."""
    return torch.from_numpy(np.array(rows, dtype=np.float32)).to(device)  # (n, D)


def _chunk_top(sims: torch.Tensor, kk: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(b, c) similarities -> the `kk` largest per row as (values, columns), ordered (value desc, column asc)."""
    take = min(kk, sims.shape[1])
    if take == sims.shape[1]:
        return _value_then_column(*sims.topk(take, dim=1))
    values, columns = sims.topk(take + 1, dim=1)  # (b, take + 1): tied values picked and ordered in no set way
    # the (take + 1)-th value equal to the take-th: equal columns may have been left out, or picked out of order
    left_out = torch.isfinite(values[:, take - 1]) & (values[:, take] == values[:, take - 1])  # (b,)
    values, columns = _value_then_column(values[:, :take], columns[:, :take])
    if bool(left_out.any()):  # a tie at the k-th value: take the lowest columns of it (a stable full sort)
        tied = left_out.nonzero()[:, 0]  # (t,)
        order = sims[tied].argsort(dim=1, descending=True, stable=True)[:, :take]  # (t, take)
        values[tied], columns[tied] = sims[tied].gather(1, order), order
    return values, columns


def _value_then_column(values: torch.Tensor, columns: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Reorder (b, n) picks by value descending, equal values by column ascending."""
    by_column = columns.argsort(dim=1)  # columns are distinct: no stability needed
    values, columns = values.gather(1, by_column), columns.gather(1, by_column)
    by_value = values.argsort(dim=1, descending=True, stable=True)
    return values.gather(1, by_value), columns.gather(1, by_value)


def weighted_vote(sims: torch.Tensor, rows: torch.Tensor, labels: torch.Tensor, num_classes: int, k: int,
                  temperature: float) -> torch.Tensor:
    """(b, >= k) neighbour similarities and rows, (N,) labels of the rows -> (b, num_classes) class scores: each of
    the first k neighbours adds exp(similarity / T) to its class (DINO's one-hot product summed over neighbours);
    missing neighbours (row -1) add nothing. Rows go in groups of at most VOTE_VALUES one-hot values."""
    step = max(1, VOTE_VALUES // (k * num_classes))
    if sims.shape[0] > step:
        return torch.cat([weighted_vote(sims[i:i + step], rows[i:i + step], labels, num_classes, k, temperature)
                          for i in range(0, sims.shape[0], step)])  # (b, C)
    sims, rows = sims[:, :k], rows[:, :k]  # (b, k)
    present = rows >= 0
    neighbour_labels = labels[rows.clamp_min(0)].clamp_min(0)  # (b, k)
    weights = torch.where(present, (sims / temperature).exp(), torch.zeros_like(sims))  # (b, k)
    one_hot = torch.zeros(*rows.shape, num_classes, device=sims.device)  # (b, k, C)
    one_hot.scatter_(2, neighbour_labels[..., None], 1.0)
    return (one_hot * weights[..., None]).sum(dim=1)  # (b, C)


def rank_hits(scores: torch.Tensor, targets: torch.Tensor, top: int = 5) -> Tuple[torch.Tensor, torch.Tensor,
                                                                                  torch.Tensor]:
    """(b, C) class scores and (b,) target classes -> predicted class (b,), top-1 hit (b,), top-`top` hit (b,).

    Classes rank by score, equal scores by the lower class index; a class no neighbour voted for (score 0) never
    counts as a hit, so top-5 does not depend on how classes without votes would be ordered."""
    order = scores.argsort(dim=1, descending=True, stable=True)  # (b, C)
    position = (order == targets.clamp_min(0)[:, None]).int().argmax(dim=1)  # (b,) the target's rank
    voted = scores.gather(1, targets.clamp_min(0)[:, None])[:, 0] > 0  # (b,)
    return order[:, 0], voted & (position == 0), voted & (position < top)
