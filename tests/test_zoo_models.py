"""Tests for the model zoo in ``fxjac/zoo.py``."""

from __future__ import annotations

import importlib.util
import pathlib
import sys

import pytest
import torch
import torch.fx as fx
from torch import nn

try:
    from fxjac import zoo
except ImportError:
    # Lets the zoo be tested on its own while the package is being assembled;
    # it has no dependency on the rest of fxjac.
    _path = pathlib.Path(__file__).resolve().parents[1] / "fxjac" / "zoo.py"
    _spec = importlib.util.spec_from_file_location("fxjac_zoo_standalone", _path)
    zoo = importlib.util.module_from_spec(_spec)
    # dataclasses resolve annotations through sys.modules at class creation.
    sys.modules[_spec.name] = zoo
    _spec.loader.exec_module(zoo)


EXPECTED_NAMES = {
    "mlp",
    "cnn",
    "resnet",
    "unet",
    "transformer_explicit",
    "transformer_mha",
    "transformer_sdpa",
    "two_input",
    "shape_arith",
    "small_mlp",
    "large_mlp",
}

# large_mlp at bench size is only checked for its parameter count.
CASES = [
    (name, preset)
    for name in zoo.names(include_all=True)
    for preset in zoo.PRESETS
    if (name, preset) != ("large_mlp", "bench")
]


class _LeafTracer(fx.Tracer):
    """Traces into every module except the given types."""

    def __init__(self, leaves: tuple[type[nn.Module], ...]) -> None:
        super().__init__()
        self.leaves = leaves

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, self.leaves)


def test_registry_contents():
    assert set(zoo.ZOO) == EXPECTED_NAMES
    assert "large_mlp" not in zoo.names()
    assert set(zoo.names(include_all=True)) == EXPECTED_NAMES
    for name, entry in zoo.ZOO.items():
        assert entry.name == name
        assert entry.loss == ("mse" if name == "unet" else "cross_entropy")
        assert entry.input_shapes == entry.small.input_shapes
        for preset in zoo.PRESETS:
            sizes = entry.sizes(preset)
            assert all(isinstance(s, tuple) for s in sizes.input_shapes)
    with pytest.raises(ValueError):
        zoo.ZOO["mlp"].sizes("huge")
    with pytest.raises(KeyError):
        zoo.build("nope")


@pytest.mark.parametrize("name,preset", CASES)
def test_forward(name, preset):
    model, sizes = zoo.build(name, preset)
    assert not any(m.training for m in model.modules())
    assert all(p.dtype == torch.float64 for p in model.parameters())
    for batch in (1, 3):
        xs = zoo.example_inputs(name, batch, preset)
        assert len(xs) == len(sizes.input_shapes)
        for x, shape in zip(xs, sizes.input_shapes):
            assert x.shape == (batch, *shape) and x.dtype == torch.float64
        y = model(*xs)
        assert y.shape == (batch, *sizes.output_shape)
        assert y.dtype == torch.float64
        assert torch.isfinite(y).all()


@pytest.mark.parametrize("name,preset", CASES)
def test_deterministic(name, preset):
    m1, _ = zoo.build(name, preset, seed=3)
    m2, _ = zoo.build(name, preset, seed=3)
    s1, s2 = m1.state_dict(), m2.state_dict()
    assert s1.keys() == s2.keys()
    assert all(torch.equal(s1[k], s2[k]) for k in s1)
    xs1 = zoo.example_inputs(name, 2, preset, seed=5)
    xs2 = zoo.example_inputs(name, 2, preset, seed=5)
    assert all(torch.equal(a, b) for a, b in zip(xs1, xs2))
    assert torch.equal(m1(*xs1), m2(*xs2))
    m3, _ = zoo.build(name, preset, seed=4)
    assert not all(torch.equal(a, b) for a, b in zip(m1.parameters(), m3.parameters()))


def test_build_preserves_global_rng():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    zoo.build("resnet")
    zoo.example_inputs("resnet", 2)
    assert torch.equal(torch.rand(3), expected)


def test_dtypes_share_values():
    m32, _ = zoo.build("cnn", dtype=torch.float32)
    m64, _ = zoo.build("cnn", dtype=torch.float64)
    for a, b in zip(m32.parameters(), m64.parameters()):
        assert a.dtype == torch.float32 and torch.equal(a.double(), b)


def test_batchnorm_stats_are_nontrivial():
    model, _ = zoo.build("resnet")
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    # stem + 2 per block + 1 in the downsample shortcut
    assert len(bns) == 6
    for bn in bns:
        assert not torch.allclose(bn.running_mean, torch.zeros_like(bn.running_mean))
        assert not torch.allclose(bn.running_var, torch.ones_like(bn.running_var))
        assert (bn.running_var > 0).all()


def test_large_mlp_parameter_count():
    model, _ = zoo.build("large_mlp", "bench", dtype=torch.float32)
    assert zoo.count_parameters(model) >= 1_000_000


@pytest.mark.parametrize("name", zoo.names(include_all=True))
def test_fx_symbolic_trace(name):
    model, _ = zoo.build(name)
    xs = zoo.example_inputs(name, 2)
    gm = fx.symbolic_trace(model)
    torch.testing.assert_close(gm(*xs), model(*xs), rtol=0, atol=0)
    # Tracing into all modules except the declared leaves must also work.
    leaves = zoo.ZOO[name].leaf_modules
    gm = fx.GraphModule(model, _LeafTracer(leaves).trace(model))
    torch.testing.assert_close(gm(*xs), model(*xs), rtol=0, atol=0)


def test_declared_leaves_are_needed():
    for name in ("transformer_mha", "resnet"):
        model, _ = zoo.build(name)
        with pytest.raises(fx.proxy.TraceError):
            _LeafTracer(()).trace(model)


def test_unet_other_resolution():
    model, _ = zoo.build("unet", "bench")
    x = torch.randn(2, 1, 16, 16, dtype=torch.float64)
    assert model(x).shape == (2, 1, 16, 16)


def test_transformer_options():
    torch.manual_seed(0)
    kw = dict(d=8, heads=2, layers=1, seq=5, classes=3)
    x = torch.randn(2, 5, 8)
    plain = zoo.Transformer(**kw, attention="sdpa").eval()
    causal = zoo.Transformer(**kw, attention="sdpa", causal=True).eval()
    causal.load_state_dict(plain.state_dict())
    assert not torch.allclose(plain(x), causal(x))
    with pytest.raises(ValueError):
        zoo.Transformer(**kw, attention="explicit", causal=True)
    with pytest.raises(ValueError):
        zoo.Transformer(**kw, attention="flash")
    tokens = zoo.Transformer(**kw, vocab=11).eval()
    assert tokens(torch.randint(0, 11, (2, 5))).shape == (2, 3)


def test_attention_variants_agree():
    """The explicit and SDPA attentions compute the same function."""
    explicit, _ = zoo.build("transformer_explicit")
    sdpa, _ = zoo.build("transformer_sdpa")
    # Same construction order gives the same parameters and state keys.
    sdpa.load_state_dict(explicit.state_dict())
    (x,) = zoo.example_inputs("transformer_explicit", 3)
    torch.testing.assert_close(explicit(x), sdpa(x))
