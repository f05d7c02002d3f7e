from __future__ import annotations

import pytest
import torch

from mosaic_export.method.prune.structured import (
    choose_channels,
    choose_heads,
    compensate,
    head_scores,
    magnitude_channel_scores,
    magnitude_head_scores,
)
from mosaic_export.model.arch import arch_for
from mosaic_export.model.resize import expand_heads, resize_layer
from tests.conftest import tiny_model

SPEC = arch_for("llama")
HEAD_DIM = 16  # tiny model: hidden 64, 4 heads, 2 KV heads


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("q_heads, kv_heads", [
    ([0, 1], [0]),  # drop KV group 1 (heads 2, 3)
    ([0, 2], [0, 1]),  # drop one query head in each group
    ([3], [1]),  # keep a single head
])
def test_head_removal_exact_when_removed_heads_are_zero(q_heads, kv_heads):
    model = tiny_model()
    layer = SPEC.layer_list(model)[1]
    removed = [h for h in range(4) if h not in q_heads]
    o = SPEC.projection(layer, "o")
    with torch.no_grad():
        o.weight[:, expand_heads(removed, HEAD_DIM)] = 0.0  # those heads contribute nothing
    ids = torch.randint(0, 320, (2, 24), generator=torch.Generator().manual_seed(0))
    before = _logits(model, ids)
    resize_layer(layer, SPEC, HEAD_DIM, q_heads, kv_heads, channels=list(range(96)))
    assert SPEC.projection(layer, "q").weight.shape == (16 * len(q_heads), 64)
    assert SPEC.projection(layer, "k").weight.shape == (16 * len(kv_heads), 64)
    assert SPEC.projection(layer, "o").weight.shape == (64, 16 * len(q_heads))
    assert torch.allclose(_logits(model, ids), before, atol=1e-5)


def test_channel_removal_exact_when_removed_channels_are_zero():
    model = tiny_model()
    layer = SPEC.layer_list(model)[0]
    keep = [j for j in range(96) if j % 3]
    with torch.no_grad():
        SPEC.projection(layer, "down").weight[:, [j for j in range(96) if j % 3 == 0]] = 0.0
    ids = torch.randint(0, 320, (2, 24), generator=torch.Generator().manual_seed(1))
    before = _logits(model, ids)
    resize_layer(layer, SPEC, HEAD_DIM, [0, 1, 2, 3], [0, 1], keep)
    assert SPEC.projection(layer, "gate").weight.shape == (64, 64)
    assert SPEC.projection(layer, "down").weight.shape == (64, 64)
    assert torch.allclose(_logits(model, ids), before, atol=1e-5)


def test_resize_keeps_bias_rows():
    model = tiny_model(attention_bias=True)
    layer = SPEC.layer_list(model)[0]
    k_bias = SPEC.projection(layer, "k").bias.detach().clone()
    resize_layer(layer, SPEC, HEAD_DIM, [2, 3], [1], list(range(96)))
    assert torch.equal(SPEC.projection(layer, "k").bias, k_bias[16:32])


def test_compensation_is_exact_when_removed_inputs_are_combinations_of_kept():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(400, 6, generator=g)
    x = torch.cat([base, base[:, :2] @ torch.randn(2, 2, generator=g)], dim=1)  # cols 6, 7 dependent
    w = torch.randn(5, 8, generator=g)
    keep = torch.arange(6)
    w_new = compensate(w, x.T @ x, keep, damp=0.0)
    assert torch.allclose(x[:, keep] @ w_new.T, x @ w.T, atol=1e-4)
    # Without compensation, dropping them changes the output.
    assert not torch.allclose(x[:, keep] @ w[:, keep].T, x @ w.T, atol=1e-2)


def test_compensation_leaves_weights_when_removed_inputs_are_silent():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 5, generator=g)
    x[:, 3] = 0.0
    w = torch.randn(4, 5, generator=g)
    keep = torch.tensor([0, 1, 2, 4])
    assert torch.allclose(compensate(w, x.T @ x, keep, damp=0.0), w[:, keep], atol=1e-5)


def test_choose_heads_and_channels():
    scores = torch.tensor([1.0, 9.0, 2.0, 3.0, 8.0, 7.0])  # 3 KV groups of 2 query heads
    c = choose_heads(scores, n_kv=3, n_groups=2, q_per_group=1)
    assert c.kv_heads == [0, 2] and c.q_heads == [1, 4]  # best single heads 9 (g0), 8 (g2)
    c = choose_heads(scores, n_kv=3, n_groups=1, q_per_group=2)
    assert c.kv_heads == [2] and c.q_heads == [4, 5]  # group sums 10, 5, 15
    assert choose_channels(torch.tensor([0.5, 0.1, 0.9, 0.3]), 2) == [0, 2]
    w_o = torch.ones(3, 4)
    sq = torch.tensor([1.0, 1.0, 4.0, 0.0])
    assert head_scores(w_o, sq, head_dim=2).tolist() == [6.0, 12.0]


def test_magnitude_scores_by_hand():
    # 2 heads of dim 2: q rows 0-1 belong to head 0, rows 2-3 to head 1; o columns likewise.
    w_q = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 0.0], [0.0, 0.0]])
    w_o = torch.tensor([[1.0, 1.0, 0.0, 2.0]])
    assert magnitude_head_scores(w_q, w_o, head_dim=2).tolist() == [1 + 4 + 1 + 1, 9 + 0 + 0 + 4]
    gate = torch.tensor([[1.0, 1.0], [0.0, 3.0], [0.0, 0.0]])  # 3 channels, hidden 2
    up = torch.tensor([[0.0, 1.0], [1.0, 0.0], [2.0, 0.0]])
    down = torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 1.0]])  # (hidden, channels)
    assert magnitude_channel_scores(gate, up, down).tolist() == [2 + 1 + 1, 9 + 1 + 0, 0 + 4 + 2]
