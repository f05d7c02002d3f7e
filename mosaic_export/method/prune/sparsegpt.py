"""SparseGPT (Frantar & Alistarh, 2023): prune with Optimal Brain Surgeon weight updates.

Columns are processed left to right in blocks. Within a block the weights with the smallest
w^2 / [H^-1]_kk^2 are removed, and each removal's error is spread over the not-yet-processed
columns through the Cholesky factor of the inverse Hessian H = X^T X (d_in, d_in), so the layer's
output on the calibration data changes as little as possible.
"""

from __future__ import annotations

import torch


def sparsegpt_prune(weight: torch.Tensor, hessian: torch.Tensor, ratio: float,
                    block_size: int = 128, damp: float = 0.01) -> torch.Tensor:
    """Pruned copy of weight (out, in) with exactly round(ratio * block numel) zeros per block."""
    W = weight.detach().clone().double()  # (out, in)
    n_in = W.shape[1]
    if ratio <= 0:
        return weight.detach().clone()
    H = hessian.detach().clone().double()  # (in, in)
    dead = torch.diag(H) == 0  # inputs never active: their weights cannot matter
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    H += damp * torch.mean(torch.diag(H)) * torch.eye(n_in, dtype=H.dtype)
    # Upper Cholesky factor of H^-1: row i holds the update coefficients for column i.
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)

    for i1 in range(0, n_in, block_size):
        i2 = min(i1 + block_size, n_in)
        W1 = W[:, i1:i2].clone()  # (out, b)
        Hinv1 = Hinv[i1:i2, i1:i2]  # (b, b)
        err = torch.zeros_like(W1)
        saliency = W1**2 / torch.diag(Hinv1).unsqueeze(0) ** 2
        k = int(round(ratio * saliency.numel()))
        mask = torch.zeros_like(W1, dtype=torch.bool)
        if k > 0:
            order = torch.sort(saliency.flatten(), stable=True).indices[:k]
            mask.view(-1)[order] = True
        for i in range(i2 - i1):
            w = W1[:, i]
            q = w.masked_fill(mask[:, i], 0.0)
            e = (w - q) / Hinv1[i, i]
            W1[:, i:] -= e.unsqueeze(1) * Hinv1[i, i:].unsqueeze(0)
            W1[:, i] = q
            err[:, i] = e
        W[:, i1:i2] = W1
        W[:, i2:] -= err @ Hinv[i1:i2, i2:]
    return W.to(weight.dtype)
