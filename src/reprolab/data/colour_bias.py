"""Colour-Biased MNIST's background colour per image (spec blackvip.md §6.3, from ReBias).

One function for both datasets that build it: the real `colour_biased_mnist`
(`datasets/mnist_variants.py`) and its offline stand-in `biased_digits` (`datasets/synthetic.py`).

Until this module the two had their own copies and rounded differently. `biased_digits`
(`assign_bias_colors`, floor/ceil with a 1e-9 guard, leftovers to the last colour) already gave the
exact-arithmetic counts below, so its assignments are unchanged. The `mnist_variants` copy took
floor(n*rho) and ceil(n*(1-rho)/9) on floats: a product that should be a whole number but lands just
below or above it changed the counts, e.g. n = 100, rho = 0.29 gave 28 own-colour images instead of 29
(and 72 instead of 71 to the others), and n = 300, rho = 0.19 chunks of 28 (8 colours x 28 + 19)
instead of 27 (9 x 27). At the rho the configs use (0.8 / 0.2, 0.9 / 0.1) with the MNIST class sizes
the two copies agreed, so no image of either dataset moves there (0 images per class).
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np

N_CLASSES = 10
N_CONFUSING = N_CLASSES - 1  # ReBias `n_confusing_labels`: every other class gets a share


def colour_assignment(
    labels: np.ndarray, rho: float, rng: np.random.RandomState | np.random.Generator
) -> np.ndarray:
    """Background colour index (0..9) per image, for labels in 0..9 (others get -1).

    Per class (spec §6.3): shuffle its indices; the first ⌊n·ρ⌋ get the class's own colour; the rest
    are cut into chunks of ⌈n(1−ρ)/9⌉, one chunk to each of the other 9 colours in shuffled order
    (the other-colour order is shuffled for every class, as ReBias does, even when no image is left).

    The rounding is done in exact arithmetic on rho as written (`0.29` is 29/100, not the float just
    below it), so the counts never depend on floating-point error. ⌈n(1−ρ)/9⌉ is computed as
    ⌈(n − ⌊n·ρ⌋)/9⌉, the same number (n − ⌊nρ⌋ = ⌈n(1−ρ)⌉ and ⌈⌈x⌉/9⌉ = ⌈x/9⌉), so the 9 chunks
    always cover the rest and the last colour gets what is left after 8 full chunks.

    `rng` is numpy's legacy `RandomState` (the real dataset, seeded like the official code) or a
    `Generator` (the synthetic stand-in); both draw the same calls (`permutation`), class by class.
    """
    ratio = Fraction(str(float(rho)))
    if not 0 <= ratio <= 1:
        raise ValueError(f"rho must be in [0, 1], got {rho}")
    labels = np.asarray(labels)
    colour = np.full(len(labels), -1, np.int64)
    for y in range(N_CLASSES):
        idx = rng.permutation(np.flatnonzero(labels == y))
        n_own = math.floor(len(idx) * ratio)
        colour[idx[:n_own]] = y
        rest = idx[n_own:]
        others = rng.permutation([c for c in range(N_CLASSES) if c != y])
        chunk = max(1, -(-len(rest) // N_CONFUSING))
        for k, c in enumerate(others):
            colour[rest[k * chunk : (k + 1) * chunk]] = c
    return colour
