from __future__ import annotations

import pytest
import torch

from mosaic_export.method.allocation import MAX_RATIO, allocate, fit_mean, owl_ratios
from mosaic_export.method.pod import outlier_ratio, wanda_scores


def test_outlier_ratio_hand_built():
    w = torch.ones(4, 4)
    w[1, 2] = 100.0
    norm = torch.ones(4)
    # mean = (15 + 100) / 16 = 7.1875; M = 5 -> threshold 35.9: one outlier of 16
    assert outlier_ratio(wanda_scores(w, norm), 5.0) == pytest.approx(1 / 16)
    # The input norm scales whole columns: column 0 at norm 40 makes 4 more scores of 40 each.
    norm = torch.tensor([40.0, 1.0, 1.0, 1.0])
    scores = wanda_scores(w, norm)
    assert scores[0, 0] == 40 and scores[1, 2] == 100
    mean = (4 * 40 + 11 + 100) / 16  # 16.9375 -> threshold 3 x mean = 50.8: only the 100
    assert outlier_ratio(scores, 3.0) == pytest.approx(1 / 16)
    assert outlier_ratio(scores, 2.0) == pytest.approx(5 / 16)  # 33.9: the 40s and the 100
    assert mean * 2 < 40


def test_layer_ratio_uses_one_mean_over_all_matrices():
    a = torch.full((2, 5), 1.0)
    b = torch.full((2, 5), 10.0)
    # together: mean 5.5, M=1.5 -> threshold 8.25: all of b (10 of 20)
    assert outlier_ratio([a, b], 1.5) == pytest.approx(0.5)
    assert outlier_ratio(b, 1.5) == 0.0


def test_owl_rule_by_hand():
    r = torch.tensor([0.01, 0.02, 0.03])
    lam, s = 0.08, 0.5
    # c = (r - 0.01) / 0.02 * 0.16 = [0, 0.08, 0.16], mean 0.08; density = 0.5 + c - 0.08
    expected_sparsity = 1 - (0.5 + torch.tensor([0.0, 0.08, 0.16]) - 0.08)
    assert torch.allclose(owl_ratios(r, s, lam), expected_sparsity.double())
    assert owl_ratios(torch.tensor([0.2, 0.2]), 0.3, lam).tolist() == pytest.approx([0.3, 0.3])


@pytest.mark.parametrize("method", ["uniform", "layer", "projection", "joint", "layer+type"])
@pytest.mark.parametrize("target", [0.0, 0.3, 0.5, 0.7, 0.9, 0.95])
def test_allocation_mean_and_range(method, target):
    g = torch.Generator().manual_seed(1)
    n = 12
    names = ["q", "k", "v", "o", "gate", "up", "down"]
    pod = {p: torch.rand(n, generator=g) * 0.05 for p in names}
    layer = torch.rand(n, generator=g) * 0.05
    weights = {p: torch.randint(100, 5000, (n,), generator=g).double() for p in names}
    ratios = allocate(method, target, 0.2, pod, layer, weights)
    num = sum((ratios[p] * weights[p]).sum() for p in names)
    den = sum(weights[p].sum() for p in names)
    assert float(num / den) == pytest.approx(target, abs=1e-6)
    for p in names:
        assert float(ratios[p].min()) >= 0 and float(ratios[p].max()) < 1
        assert float(ratios[p].max()) <= MAX_RATIO
    if method == "projection":  # each type keeps the target as its own mean
        for p in names:
            mean = float((ratios[p] * weights[p]).sum() / weights[p].sum())
            assert mean == pytest.approx(target, abs=1e-6)


def test_more_outliers_less_pruning():
    pod = {"q": torch.tensor([0.01, 0.05, 0.03]), "down": torch.tensor([0.04, 0.02, 0.01])}
    w = {p: torch.ones(3) for p in pod}
    r = allocate("projection", 0.5, 0.08, pod, torch.zeros(3), w)
    assert r["q"].argsort().tolist() == [1, 2, 0]  # most outliers (layer 1) pruned least
    assert r["down"].argsort().tolist() == [0, 1, 2]


def test_joint_rules_move_pruning_between_types():
    """The joint rule and layer+type prune the type with more outliers less, at the same overall
    mean; the per-type rule cannot (each type at the target)."""
    pod = {"q": torch.tensor([0.01, 0.02, 0.03]), "down": torch.tensor([0.05, 0.06, 0.07])}
    w = {p: torch.ones(3) for p in pod}
    for method in ("joint", "layer+type"):
        r = allocate(method, 0.5, 0.08, pod, torch.tensor([0.03, 0.04, 0.05]), w)
        assert float(r["down"].mean()) < 0.5 < float(r["q"].mean())
        assert float((r["q"].sum() + r["down"].sum()) / 6) == pytest.approx(0.5, abs=1e-9)
    # joint by hand: OWL over the six cells, c = (r - 0.01) / 0.06 * 0.16, mean 0.08
    c = (torch.tensor([0.01, 0.02, 0.03, 0.05, 0.06, 0.07]).double() - 0.01) / 0.06 * 0.16
    expected = 1 - (0.5 + c - c.mean())
    r = allocate("joint", 0.5, 0.08, pod, torch.zeros(3), w)
    assert torch.allclose(torch.cat([r["q"], r["down"]]), expected)
    r = allocate("projection", 0.5, 0.08, pod, torch.zeros(3), w)
    assert float(r["q"].mean()) == pytest.approx(0.5) and float(r["down"].mean()) == pytest.approx(0.5)


def test_allocation_rules_are_registered_by_name():
    from mosaic_export.method import allocation

    assert allocation.names()[:5] == ("uniform", "layer", "projection", "joint", "layer+type")
    with pytest.raises(ValueError, match="already registered"):
        allocation.register("layer", allocation.layer)
    with pytest.raises(ValueError, match="unknown allocation 'spectral'"):
        allocate("spectral", 0.5, 0.08, {"q": torch.zeros(2)}, torch.zeros(2), {"q": torch.ones(2)})


def test_fit_mean_clips_and_keeps_mean():
    r = torch.tensor([-0.2, 0.5, 1.3])
    out = fit_mean(r, torch.tensor([1.0, 2.0, 1.0]), 0.6)
    assert float(out.min()) >= 0 and float(out.max()) <= MAX_RATIO
    assert float((out * torch.tensor([1.0, 2.0, 1.0])).sum() / 4) == pytest.approx(0.6, abs=1e-9)
