"""The statistics of a comparison of runs: confidence intervals of an accuracy, the exact McNemar test of two
classifiers on the same images, the exact sign test of paired per-image scores, Holm's correction over many pairs,
and the Pareto front of accuracy against cost.

Plain Python and numpy on counts, so every number can be checked by hand.
"""
from __future__ import annotations

import math
from fractions import Fraction
from typing import List, Sequence, Tuple

Z_95 = 1.959963984540054  # the standard normal's 97.5 % quantile: a two-sided 95 % interval


def wilson_interval(successes: int, trials: int, z: float = Z_95) -> Tuple[float, float]:
    """Wilson's score interval for a binomial proportion (Wilson 1927; Newcombe 1998, method 3).

    Chosen over the normal (Wald) interval because it stays inside [0, 1] and keeps its coverage near 0 % and 100 %
    accuracy and for small folders, and over the bootstrap because it is exact arithmetic on two counts, the same on
    every machine. (nan, nan) when there are no trials."""
    if trials <= 0:
        return float("nan"), float("nan")
    p = successes / trials
    z2 = z * z
    centre = (p + z2 / (2 * trials)) / (1 + z2 / trials)
    half = z / (1 + z2 / trials) * math.sqrt(p * (1 - p) / trials + z2 / (4 * trials * trials))
    return max(0.0, centre - half), min(1.0, centre + half)


def mcnemar_exact(a_only: int, b_only: int) -> float:
    """Exact two-sided McNemar p-value from the discordant pairs: under "equally good", each image that exactly one
    of the two gets right is a fair coin, so p = min(1, 2·Σ_{i ≤ min(b, c)} C(b+c, i) / 2^(b+c)); 1 when b+c = 0.

    Integer arithmetic to the last step (tail sums of binomial coefficients), so there is no rounding at any n."""
    n = a_only + b_only
    if n == 0:
        return 1.0
    smaller = min(a_only, b_only)
    term, tail = 1, 1  # C(n, 0)
    for i in range(1, smaller + 1):
        term = term * (n - i + 1) // i  # C(n, i), exact
        tail += term
    return min(1.0, float(Fraction(2 * tail, 2 ** n)))


def sign_test(positive: int, negative: int) -> float:
    """Exact two-sided sign test of paired differences from the counts of positive and negative ones (zeros are
    dropped): under "no difference" each nonzero difference is a fair coin, which is the binomial tail of
    `mcnemar_exact`, so it is computed there. 1 when every difference is zero."""
    return mcnemar_exact(positive, negative)


def holm_adjusted(p_values: Sequence[float]) -> List[float]:
    """Holm's step-down adjusted p-values (Holm 1979): controls the chance of any false "real difference" over all
    pairs at once, which matters when a sweep of k models makes k·(k-1)/2 comparisons."""
    order = sorted(range(len(p_values)), key=lambda i: p_values[i])
    adjusted = [1.0] * len(p_values)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(p_values) - rank) * p_values[i]))
        adjusted[i] = running
    return adjusted


def pareto_front(costs: Sequence[float], gains: Sequence[float]) -> List[bool]:
    """For each point, whether no other point is at least as cheap and at least as good and strictly better in one
    of the two (lower cost is better, higher gain is better). Points with a NaN are never on the front."""
    marks = []
    for i, (cost, gain) in enumerate(zip(costs, gains)):
        if math.isnan(cost) or math.isnan(gain):
            marks.append(False)
            continue
        dominated = any(j != i and not (math.isnan(c) or math.isnan(g)) and c <= cost and g >= gain
                        and (c < cost or g > gain) for j, (c, g) in enumerate(zip(costs, gains)))
        marks.append(not dominated)
    return marks


def p_value_text(p: float) -> str:
    """'p < 0.001', 'p = 0.023', 'p = 1'."""
    if p < 0.001:
        return "p < 0.001"
    return f"p = {p:.3g}"
