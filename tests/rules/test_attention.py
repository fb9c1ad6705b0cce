"""Attention (fxjac/rules/attention.py): the SDPA / MultiheadAttention / TransformerEncoder decompositions and
masked_fill, against torch.func in float64 (reverse-mode references: fused attention has no forward mode)."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import jacrev
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from reference import (  # noqa: E402
    assert_close,
    assert_every_key_reached,
    check_diag_backprop,
    check_direction_products,
)

import fxjac  # noqa: E402
from fxjac import zoo  # noqa: E402
from fxjac.rules import attention  # noqa: E402
from fxjac.tracing import trace  # noqa: E402

D = torch.float64


def _g(seed=1):
    return torch.Generator().manual_seed(seed)


class SDPA(nn.Module):
    """Projections, then F.scaled_dot_product_attention over 2 heads (L = 3 queries, S = 5 keys)."""

    def __init__(self, causal=False, mask=None, gqa=False, scale=None, L=3):
        super().__init__()
        q_heads = 4 if gqa else 2
        self.q, self.k, self.v = nn.Linear(4, 4 * q_heads), nn.Linear(4, 8), nn.Linear(4, 8)
        self.causal, self.gqa, self.scale, self.L = causal, gqa, scale, L
        if isinstance(mask, nn.Parameter):
            self.mask = mask
        else:
            self.register_buffer("mask", mask)

    def forward(self, x):
        b = x.shape[0]
        q = self.q(x[:, : self.L]).view(b, self.L, -1, 4).transpose(1, 2)
        k = self.k(x).view(b, -1, 2, 4).transpose(1, 2)
        v = self.v(x).view(b, -1, 2, 4).transpose(1, 2)
        kw = {"enable_gqa": True} if self.gqa else {}
        # The math kernel: the fused CPU kernel cannot differentiate a learned mask (the reference needs it).
        with sdpa_kernel(SDPBackend.MATH):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=self.mask, is_causal=self.causal,
                                                  scale=self.scale, **kw)


class MHA(nn.Module):
    """nn.MultiheadAttention(6, 2) on ``[B, 5, 6]``, returning output ``out`` of its tuple."""

    def __init__(self, out=0, need_weights=True, average=True, batch_first=True, cross=False, mask=None,
                 padding=False, causal=False, data_mask=False, left_pad=False, **kw):
        super().__init__()
        self.m = nn.MultiheadAttention(6, 2, batch_first=batch_first, **kw)
        self.out, self.need_weights, self.average, self.batch_first = out, need_weights, average, batch_first
        self.cross, self.padding, self.causal, self.data_mask = cross, padding, causal, data_mask
        self.left_pad = left_pad
        self.register_buffer("mask", mask)
        if cross:
            self.pk, self.pv = nn.Linear(6, kw.get("kdim", 6)), nn.Linear(6, kw.get("vdim", 6))

    def forward(self, x):
        if not self.batch_first:
            x = x.transpose(0, 1)
        k = v = x
        if self.cross:
            k, v = self.pk(x), self.pv(x)
        kpm = None
        if self.padding:  # a data-dependent boolean padding mask (a constant for differentiation)
            kpm = (x if self.batch_first else x.transpose(0, 1))[..., 0] > 1.0
        if self.left_pad:  # odd samples padded on the left by two keys: under a causal mask, rows of no key
            b, t = x.shape[0], x.shape[1]
            kpm = ((torch.arange(b) % 2 == 1).unsqueeze(1) & (torch.arange(t) < 2).unsqueeze(0))
        mask = self.mask
        if self.data_mask:  # a data-dependent [B·H, L, S] boolean mask, never blocking the diagonal
            a = x[..., 0]
            mask = ((a.unsqueeze(2) - a.unsqueeze(1)) > 1.5).repeat_interleave(2, 0)
        r = self.m(x, k, v, need_weights=self.need_weights, average_attn_weights=self.average,
                   attn_mask=mask, key_padding_mask=kpm, is_causal=self.causal)[self.out]
        return r.transpose(0, 1) if not self.batch_first and self.out == 0 else r


class SeqFirst(nn.Module):
    """A sequence-first module used on batch-first data (the API's batch is dim 0)."""

    def __init__(self, m):
        super().__init__()
        self.m = m

    def forward(self, x):
        return self.m(x.transpose(0, 1)).transpose(0, 1)


class Decoder(nn.Module):
    """nn.TransformerDecoderLayer (not decomposed itself): its two MultiheadAttention blocks are."""

    def __init__(self):
        super().__init__()
        self.d = nn.TransformerDecoderLayer(6, 2, 8, batch_first=True)

    def forward(self, x):
        return self.d(x, x[:, :3])


class FullTransformer(nn.Module):
    """nn.Transformer (encoder, decoder, their final norms) with a causal target mask made from the input."""

    def __init__(self):
        super().__init__()
        self.t = nn.Transformer(6, 2, 1, 2, 8, batch_first=True)

    def forward(self, x):
        mask = nn.Transformer.generate_square_subsequent_mask(3, dtype=x.dtype)
        return self.t(x, x[:, :3], tgt_mask=mask, tgt_is_causal=True)


class MaskedFill(nn.Module):
    """masked_fill: the method with a constant mask, torch.masked_fill with a data-dependent one."""

    def __init__(self, spelling):
        super().__init__()
        self.spelling = spelling
        self.register_buffer("mask", torch.rand(2, 5, generator=_g()) > 0.5)
        self.w = nn.Parameter(torch.randn(5, generator=_g(), dtype=D))

    def forward(self, x):
        h = x * self.w
        if self.spelling == "method":
            return h.masked_fill(self.mask, -1.5)
        return torch.masked_fill(h, h > 0.5, 0.0)


_CAUSAL = torch.ones(5, 5, dtype=torch.bool).tril()

CASES = {
    "sdpa": (lambda: SDPA(), 4),
    "sdpa causal": (lambda: SDPA(causal=True), 4),
    "sdpa causal square": (lambda: SDPA(causal=True, L=5), 4),
    "sdpa bool mask": (lambda: SDPA(mask=torch.rand(3, 5, generator=_g()) > 0.3), 4),
    "sdpa float mask": (lambda: SDPA(mask=torch.randn(2, 3, 5, generator=_g(), dtype=D)), 4),
    "sdpa learned mask": (lambda: SDPA(mask=nn.Parameter(torch.randn(3, 5, generator=_g(), dtype=D))), 4),
    "sdpa gqa": (lambda: SDPA(gqa=True), 4),
    # rows whose every key is masked: 0 there, as PyTorch's kernels give (Note [attention decompositions])
    "sdpa empty bool row": (lambda: SDPA(mask=torch.tensor([[True] * 5, [False] * 5, [True, False] * 2 + [True]])),
                            4),
    "sdpa -inf float row": (lambda: SDPA(mask=torch.randn(3, 5, generator=_g(), dtype=D).index_fill(
        0, torch.tensor([2]), float("-inf"))), 4),
    "mha left padding causal": (lambda: MHA(mask=~_CAUSAL, need_weights=False, left_pad=True), 6),
    "sdpa scale": (lambda: SDPA(scale=0.3), 4),
    "mha": (lambda: MHA(), 6),
    "mha no weights": (lambda: MHA(need_weights=False), 6),
    "mha averaged weights": (lambda: MHA(out=1), 6),
    "mha per-head weights": (lambda: MHA(out=1, average=False), 6),
    "mha seq first": (lambda: MHA(batch_first=False), 6),
    "mha seq first weights": (lambda: MHA(batch_first=False, out=1), 6),
    "mha kdim vdim": (lambda: MHA(cross=True, kdim=3, vdim=4), 6),
    "mha key is value": (lambda: MHA(cross=True), 6),
    "mha bias_kv zero_attn": (lambda: MHA(add_bias_kv=True, add_zero_attn=True), 6),
    "mha no bias": (lambda: MHA(bias=False), 6),
    "mha bool mask": (lambda: MHA(mask=~_CAUSAL, need_weights=False), 6),
    "mha data-dependent 3d mask": (lambda: MHA(data_mask=True), 6),
    "mha causal hint": (lambda: MHA(mask=~_CAUSAL, need_weights=False, causal=True), 6),
    "mha 3d float mask and padding": (lambda: MHA(mask=torch.randn(6, 5, 5, generator=_g(), dtype=D),
                                                  padding=True), 6),
    "mha padding bias_kv": (lambda: MHA(padding=True, add_bias_kv=True, mask=torch.randn(5, 5, generator=_g(),
                                                                                          dtype=D)), 6),
    "encoder layer post-norm": (lambda: nn.TransformerEncoderLayer(6, 2, 8, batch_first=True), 6),
    "encoder layer pre-norm gelu": (
        lambda: nn.TransformerEncoderLayer(6, 2, 8, batch_first=True, norm_first=True, activation="gelu"), 6),
    "encoder layer seq first": (lambda: SeqFirst(nn.TransformerEncoderLayer(6, 2, 8, activation=nn.SiLU())),
                                6),
    "encoder": (lambda: nn.TransformerEncoder(nn.TransformerEncoderLayer(6, 2, 4, batch_first=True), 2,
                                              norm=nn.LayerNorm(6), enable_nested_tensor=False), 6),
    "decoder layer": (lambda: Decoder(), 6),
    "transformer": (lambda: FullTransformer(), 6),
    "masked_fill method": (lambda: MaskedFill("method"), (2, 5)),
    "masked_fill torch": (lambda: MaskedFill("torch"), (2, 5)),
}
BATCH_ONE = ["sdpa gqa", "mha seq first", "masked_fill torch"]
INPUT_ONLY = {"encoder layer seq first"}
# Every product for these; vjp and jacobian (both modes) for the others.
FULL = {"sdpa causal", "mha", "encoder layer pre-norm gelu", "masked_fill method", "transformer",
        "sdpa empty bool row", "mha left padding causal"}


def _model(name):
    make, _ = CASES[name]
    torch.manual_seed(0)
    return nn.Sequential(make()).double().eval()


def _input(name, batch, seed=7):
    _, feat = CASES[name]
    shape = feat if isinstance(feat, tuple) else (5, feat)
    return torch.randn(batch, *shape, generator=_g(seed), dtype=D)


def _no_fallback(fn):
    """Run ``fn`` recording warnings; fail if the autograd fallback was used."""
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        out = fn()
    used = [str(w.message) for w in rec if "fallback" in str(w.message)]
    assert not used, used
    return out


@pytest.mark.parametrize("name,batch", [(n, 3) for n in CASES] + [(n, 1) for n in BATCH_ONE])
def test_direction_products(name, batch):
    model = _model(name)
    x = _input(name, batch)
    products = None if name in FULL else ("vjp", "jacobian")
    # Per-sample parameter stacks assume the batch on dim 0 of every batched value; a sequence-first layer
    # holds it on dim 1, so only input products are checked there.
    names = [] if name in INPUT_ONLY else None
    _no_fallback(lambda: check_direction_products(model, (x,), names=names, products=products))


def test_non_contiguous_input():
    model = _model("mha kdim vdim")
    x = torch.randn(3, 6, 5, generator=_g(3), dtype=D).transpose(1, 2)
    assert not x.is_contiguous()
    _no_fallback(lambda: check_direction_products(model, (x,)))


@pytest.mark.parametrize("spelling", ["method", "torch"])
def test_masked_fill_diag_backprop(spelling):
    """masked_fill alone (one op): diagonal back-propagation is exact."""

    class One(nn.Module):
        def forward(self, x):
            return MaskedFill.forward(self, x)

    one = One()
    one.spelling = spelling
    one.mask = torch.rand(2, 5, generator=_g()) > 0.5
    one.w = 1.0
    x = torch.randn(3, 2, 5, generator=_g(4), dtype=D)
    _no_fallback(lambda: check_diag_backprop(one, (x,)))


@pytest.mark.parametrize("name", ["sdpa causal", "sdpa gqa", "mha bias_kv zero_attn", "encoder"])
def test_diag_backprop_uses_structured_rules(name):
    """Attention is several ops, so diagonal back-propagation is an approximation; it must run on structured
    rules only and give finite values."""
    model = _model(name)
    x = _input(name, 3)
    for wrt in ("input", "params"):
        p = fxjac.jtmjp(model, wrt=wrt, matrix="identity", out="diag", method="diag_backprop")
        _, r = _no_fallback(lambda: p(x))
        assert torch.isfinite(r).all()


def _per_sample_jacobian(f, x):
    b = x.shape[0]
    J = jacrev(f)(x)
    J = J.reshape(b, -1, b, x[0].numel())
    return torch.stack([J[i, :, i] for i in range(b)])


@pytest.mark.parametrize("output", [0, 1])
def test_mha_tuple_output_selection(output):
    """A model returning MultiheadAttention's tuple: ``output=`` picks the attention output or the weights."""

    class Tuple(nn.Module):
        def __init__(self):
            super().__init__()
            self.m = nn.MultiheadAttention(6, 2, batch_first=True)

        def forward(self, x):
            return self.m(x, x, x)

    torch.manual_seed(0)
    model = Tuple().double().eval()
    x = torch.randn(3, 5, 6, generator=_g(5), dtype=D)
    ref = _per_sample_jacobian(lambda z: model(z)[output], x)
    for mode in ("forward", "reverse"):
        _, J = _no_fallback(lambda: fxjac.jacobian(model, output=output, mode=mode)(x))
        assert_close(J, ref, f"jacobian[output={output}, {mode}]")
    w = torch.randn(model(x)[output].shape, generator=_g(6), dtype=D)
    _, c = _no_fallback(lambda: fxjac.vjp(model, output=output)(x, w))
    assert_close(c.reshape(3, -1), torch.einsum("boi,bo->bi", ref, w.reshape(3, -1)), f"vjp[output={output}]")


@pytest.mark.parametrize("name", ["transformer_mha", "transformer_sdpa"])
def test_zoo_transformers(name):
    """The zoo's transformers, nn.MultiheadAttention included, run on structured rules only (the zoo's
    ``leaf_modules`` are not passed: the decomposition replaces them)."""
    model, _ = zoo.build(name)
    (x,) = zoo.example_inputs(name, batch=2)
    _no_fallback(lambda: check_direction_products(model, (x,)))


def test_sdpa_dropout_is_refused():
    class Drop(nn.Module):
        def forward(self, x):
            return F.scaled_dot_product_attention(x, x, x, dropout_p=0.1)

    with pytest.raises(fxjac.ModeError):
        trace(nn.Sequential(Drop()))


def test_mha_training_dropout_is_refused():
    model = nn.Sequential(nn.TransformerEncoderLayer(6, 2, 8, dropout=0.1, batch_first=True)).train()
    with pytest.raises(fxjac.ModeError):
        trace(model)


def test_decompositions_reproduce_the_modules():
    """The traced decompositions give the modules' own outputs (fast path included, under no_grad)."""
    names = ("mha", "mha seq first", "mha 3d float mask and padding", "encoder layer post-norm", "encoder",
             "transformer")
    for name in names:
        model = _model(name)
        x = _input(name, 3)
        with torch.no_grad():
            assert_close(trace(model)(x), model(x), name)


def test_every_attention_key_has_a_case():
    """Every key registered by attention.py is reached by some case above."""
    assert_every_key_reached(attention, (_model(name) for name in CASES))


def test_empty_rows_match_the_kernels_and_a_mismatch_says_where(monkeypatch):
    """A fully masked row is 0 in the model's own output (PyTorch's kernels); the decomposition agrees, and where
    a traced graph gives NaN where the model is finite, the first call's TraceError says so (not "mutation")."""
    model = _model("mha left padding causal")
    x = _input("mha left padding causal", 3)
    y = model(x)
    assert torch.isfinite(y).all() and (y[1, :2] == 0).all()
    assert_close(fxjac.jvp(model)(x, x)[0], y, "primal with empty rows")
    monkeypatch.setattr(attention, "_masked_softmax", lambda s: torch.softmax(s, dim=-1))
    with pytest.raises(fxjac.TraceError, match="NaN or inf where the model's output is finite"):
        fxjac.vjp(_model("sdpa empty bool row"))(_input("sdpa empty bool row", 2), torch.ones(2, 2, 3, 4, dtype=D))
