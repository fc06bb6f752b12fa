"""Hypernetwork factors and the two offset mechanisms, with numbers."""

import pytest
import torch
from torch import nn

from lib_ostaf.errors import IncompatibleModelError, InputError
from lib_ostaf.method.hypernet import DirectLoRA, HypernetConfig, LayerShape, OstafHypernet
from lib_ostaf.method.offsets import OffsetHooks, WeightPatcher, check_lambda, delta_weight

LAYERS = [
    LayerShape("l0", "attn1.to_q", 16, 16),
    LayerShape("l1", "attn2.to_k", 24, 16),
    LayerShape("l2", "attn1.to_out.0", 16, 8),
]


def test_hypernet_emits_rank_r_factors_and_starts_at_zero():
    torch.manual_seed(0)
    net = OstafHypernet(LAYERS, HypernetConfig(rank=3, code_dim=8, hidden=16))
    factors = net()
    for layer in LAYERS:
        down, up = factors[layer.key]
        assert down.shape == (3, layer.in_features)
        assert up.shape == (layer.out_features, 3)
        assert torch.count_nonzero(up) == 0  # zero-init: ΔW = 0 at step 0
        assert torch.linalg.matrix_rank(down).item() == 3


def test_hypernet_is_shared_one_step_moves_every_layer():
    torch.manual_seed(0)
    net = OstafHypernet(LAYERS, HypernetConfig(rank=2, code_dim=8, hidden=16))
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    # a loss on layer l0 only
    down, up = net()["l0"]
    (up @ down).sum().backward()
    opt.step()
    after = net()
    # sharing: l2 has the same out width (16 → no), l1 shares the up head of width 16
    assert after["l1"][1].abs().sum() > 0
    direct = DirectLoRA(LAYERS, HypernetConfig(rank=2))
    opt = torch.optim.SGD(direct.parameters(), lr=0.1)
    down, up = direct()["l0"]
    (up @ down).sum().backward()
    opt.step()
    assert direct()["l1"][1].abs().sum() == 0  # independent LoRA: l1 untouched


def test_bad_config():
    with pytest.raises(InputError):
        HypernetConfig(rank=0)
    with pytest.raises(InputError):
        HypernetConfig(rank=-2)
    with pytest.raises(InputError):
        OstafHypernet([], HypernetConfig())
    with pytest.raises(InputError):
        OstafHypernet([LAYERS[0], LAYERS[0]], HypernetConfig())


def test_hooks_add_exact_low_rank_offset_and_remove_cleanly():
    torch.manual_seed(0)
    lin = nn.Linear(16, 8)
    x = torch.randn(5, 16)
    base = lin(x)
    down, up = torch.randn(2, 16), torch.randn(8, 2)
    with OffsetHooks({"l": lin}, scale=0.5) as hooks:
        hooks.factors = {"l": (down, up)}
        y = lin(x)
    expected = x @ (lin.weight + 0.5 * up @ down).T + lin.bias
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(lin(x), base)  # hooks gone


def _linears(seed=0):
    torch.manual_seed(seed)
    return {"a": nn.Linear(8, 8), "b": nn.Linear(8, 4)}


def test_patcher_lambda_zero_is_identity_and_restore_is_bit_exact():
    mods = _linears()
    pristine = {k: m.weight.detach().clone() for k, m in mods.items()}
    patcher = WeightPatcher(mods)
    deltas = {"a": torch.randn(8, 8), "b": torch.randn(4, 8)}
    patcher.apply([("x", deltas, 0.0)])
    assert all(torch.equal(mods[k].weight, pristine[k]) for k in mods)
    patcher.apply([("x", deltas, 0.7)])
    assert not torch.equal(mods["a"].weight, pristine["a"])
    torch.testing.assert_close(mods["a"].weight, pristine["a"] + 0.7 * deltas["a"])
    # changing λ re-merges from the backup, never on top of merged weights
    patcher.apply([("x", deltas, -1.3)])
    torch.testing.assert_close(mods["b"].weight, pristine["b"] - 1.3 * deltas["b"])
    patcher.apply([])
    assert all(torch.equal(mods[k].weight, pristine[k]) for k in mods)


def test_patcher_two_adapters_compose_additively_and_skip_repeats():
    mods = _linears()
    w0 = mods["a"].weight.detach().clone()
    patcher = WeightPatcher(mods)
    d1, d2 = {"a": torch.randn(8, 8)}, {"a": torch.randn(8, 8), "b": torch.randn(4, 8)}
    assert patcher.apply([("one", d1, 0.5), ("two", d2, 2.0)])
    torch.testing.assert_close(mods["a"].weight, w0 + 0.5 * d1["a"] + 2.0 * d2["a"])
    assert not patcher.apply([("one", d1, 0.5), ("two", d2, 2.0)])  # nothing changed
    patcher.restore()
    assert torch.equal(mods["a"].weight, w0)


def test_patcher_half_precision_restore_is_bit_exact():
    mods = {k: m.half() for k, m in _linears().items()}
    w0 = mods["a"].weight.detach().clone()
    patcher = WeightPatcher(mods)
    for lam in (0.3, 1.0, 0.01, -2.0):
        patcher.apply([("x", {"a": torch.randn(8, 8)}, lam)])
    patcher.restore()
    assert torch.equal(mods["a"].weight, w0)


def test_patcher_rejects_foreign_shapes_and_layers_without_touching_weights():
    mods = _linears()
    w0 = mods["a"].weight.detach().clone()
    patcher = WeightPatcher(mods)
    with pytest.raises(IncompatibleModelError, match="shape"):
        patcher.apply([("x", {"a": torch.randn(4, 4)}, 1.0)])
    with pytest.raises(IncompatibleModelError, match="lacks"):
        patcher.apply([("x", {"zzz": torch.randn(8, 8)}, 1.0)])
    assert torch.equal(mods["a"].weight, w0)


@pytest.mark.parametrize("bad", ["abc", None, float("nan"), float("inf"), "1e999"])
def test_lambda_must_be_a_finite_number(bad):
    with pytest.raises(InputError):
        check_lambda(bad)
    assert check_lambda("0.5") == 0.5


def test_delta_weight_alpha_scaling():
    down, up = torch.randn(4, 6), torch.randn(3, 4)
    torch.testing.assert_close(delta_weight(down, up, alpha=2.0), 0.5 * up @ down)
    torch.testing.assert_close(delta_weight(down, up), up @ down)


def test_batched_heads_equal_per_layer_heads():
    """forward() runs each head once per width; the factors equal a per-layer evaluation."""
    torch.manual_seed(0)
    net = OstafHypernet(LAYERS, HypernetConfig(rank=3, code_dim=8, hidden=16))
    for head in net.up_heads.values():  # non-zero B so the check means something
        torch.nn.init.normal_(head.weight)
    factors = net()
    features = net.trunk(net.codes + net.kind_embedding(net.kind_ids))
    for i, layer in enumerate(LAYERS):
        n_in, n_out = layer.in_features, layer.out_features
        down = net.down_heads[str(n_in)](features[i]).view(3, n_in) / n_in**0.5
        up = net.up_heads[str(n_out)](features[i]).view(n_out, 3)
        torch.testing.assert_close(factors[layer.key][0], down, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(factors[layer.key][1], up, rtol=1e-6, atol=1e-7)
