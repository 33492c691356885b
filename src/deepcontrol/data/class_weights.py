"""ENet class weighting (Paszke et al. 2016), normalised to mean 1 as the paper uses it (§3)."""

from __future__ import annotations

import numpy as np
import torch


def enet_class_weights(pixel_counts: np.ndarray | torch.Tensor, c: float = 1.02) -> torch.Tensor:
    """``w_k = 1 / ln(c + p_k)``, p_k the frequency of class k among valid pixels, mean 1.

    The mean is taken over the classes that occur; a class with no pixels gets weight 1
    (it never appears as a target of the split the counts came from, so its weight is moot).
    Normalising to mean 1 keeps the weights from scaling the learning rate, given a loss
    divided by the pixel count (see ``pixel_cross_entropy``).
    """
    counts = torch.as_tensor(np.asarray(pixel_counts), dtype=torch.float64)
    if counts.dim() != 1 or (counts < 0).any() or counts.sum() <= 0:
        raise ValueError(f"pixel_counts must be non-negative per-class counts, got {counts}")
    present = counts > 0
    p = counts / counts.sum()
    weights = torch.ones_like(p)
    weights[present] = 1.0 / torch.log(c + p[present])
    weights[present] /= weights[present].mean()
    return weights.float()
