from __future__ import annotations

import pytest
import torch

from mosaic_export.method.prune.sparsegpt import sparsegpt_prune
from mosaic_export.method.prune.wanda import wanda_mask, wanda_prune


def test_wanda_removes_smallest_scores_per_row():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(6, 10, generator=g)
    norm = torch.rand(10, generator=g) + 0.1
    pruned = wanda_prune(w, norm, 0.4)
    for row in range(6):
        score = [(abs(float(w[row, j])) * float(norm[j]), j) for j in range(10)]
        removed = {j for _, j in sorted(score)[:4]}  # brute force: the 4 smallest
        assert {j for j in range(10) if pruned[row, j] == 0} == removed
        kept = [j for j in range(10) if j not in removed]
        assert torch.equal(pruned[row, kept], w[row, kept])
    assert int(wanda_mask(w, norm, 0.0).sum()) == 0


def _calibration(n_tokens=512, d=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g) / d**0.5 + torch.eye(d)
    return torch.randn(n_tokens, d, generator=g) @ mix  # correlated features


@pytest.mark.parametrize("ratio", [0.25, 0.5, 0.7])
def test_sparsegpt_exact_sparsity_and_lower_error_than_wanda(ratio):
    x = _calibration()
    w = torch.randn(32, 64, generator=torch.Generator().manual_seed(1))
    h = x.T @ x
    pruned = sparsegpt_prune(w, h, ratio, block_size=16)
    assert int((pruned == 0).sum()) == round(ratio * 32 * 16) * 4
    err_sgpt = torch.linalg.norm(x @ (w - pruned).T)
    err_wanda = torch.linalg.norm(x @ (w - wanda_prune(w, x.norm(dim=0), ratio)).T)
    assert err_sgpt < err_wanda  # the OBS update compensates what the mask removes


def test_sparsegpt_zero_ratio_is_identity():
    x = _calibration()
    w = torch.randn(8, 64)
    assert torch.equal(sparsegpt_prune(w, x.T @ x, 0.0), w)
