"""Note [dtypes while tracing] (fxjac/tracing.py): ``x.dtype`` is read as a value while a model is traced."""

import dataclasses
import math
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from reference import assert_close, param_fn, per_sample_jacobian

import fxjac


class _FinfoMask(nn.Module):
    """Causal attention whose mask value is ``torch.finfo(x.dtype).min`` (HuggingFace's idiom)."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.v, self.head = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 3)

    def forward(self, x):
        s = x.shape[1]
        mask = torch.full((s, s), torch.finfo(x.dtype).min, dtype=x.dtype, device=x.device).triu(1)
        w = self.q(x) @ self.k(x).transpose(-1, -2) / math.sqrt(4) + mask
        return self.head(w.softmax(-1) @ self.v(x))


class _DtypeBranch(nn.Module):
    """A branch on the input's dtype (fixed for a product) and a cast to an intermediate value's dtype."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3)

    def forward(self, x):
        h = self.lin(x)
        if h.dtype == torch.float16:
            h = h.float()
        scale = torch.tensor(2.0, device=x.device).to(h.dtype)  # a traced device: a factory node
        return torch.tanh(h) * scale if x.dtype == torch.float64 else h


@pytest.mark.parametrize("lazy", [True, False], ids=["built at the first call", "example_inputs"])
def test_finfo_of_a_traced_dtype(lazy):
    torch.manual_seed(0)
    model = _FinfoMask().double()
    x = torch.randn(3, 5, 4, dtype=torch.float64)
    w = torch.randn(3, 5, 3, dtype=torch.float64)
    p = fxjac.vjp(model, wrt="params", reduce="none", example_inputs=None if lazy else (x,))
    y, got = p(x, w)
    assert_close(y, model(x), "primal")
    f, flat = param_fn(model, (x,))
    J = torch.func.jacrev(f)(flat).reshape(3, 15, -1)  # [B, O, P] of the per-sample outputs
    assert_close(got, torch.einsum("bop,bo->bp", J, w.reshape(3, 15)), "per-sample vjp with a finfo mask")
    _, diag = fxjac.ggn(model, loss="mse", out="diag", example_inputs=None if lazy else (x,))(x)
    assert_close(diag, torch.einsum("bop,bop->p", J, J), "GGN diagonal with a finfo mask")


def test_a_branch_on_a_dtype_follows_the_built_one():
    torch.manual_seed(0)
    model = _DtypeBranch().double()
    x = torch.randn(3, 4, dtype=torch.float64)
    v = torch.randn(3, 4, dtype=torch.float64)
    _, got = fxjac.jvp(model)(x, v)
    J = per_sample_jacobian(model, (x,))
    assert_close(got, torch.einsum("boi,bi->bo", J, v), "jvp through a dtype branch")


class _RankBranch(nn.Module):
    """Branches on ranks (Hugging Face's ``if attention_mask.ndim == 2:``): fixed for a product, like dtypes."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x, mask):
        h = self.lin(x)
        if mask.ndim == 2:
            mask = mask[:, :, None]
        if h.dim() == 3 and mask.dim() == 3:
            h = h * mask
        return h.sum(1)


@pytest.mark.parametrize("lazy", [True, False], ids=["built at the first call", "example_inputs"])
def test_a_branch_on_a_rank_follows_the_built_one(lazy):
    # Probe BB: x.ndim and x.dim() were traced values, so a branch on them was a TraceError.
    torch.manual_seed(0)
    model = _RankBranch().double()
    x, mask = torch.randn(3, 5, 4, dtype=torch.float64), (torch.rand(3, 5) > 0.3).double()
    w = torch.randn(3, 4, dtype=torch.float64)
    p = fxjac.vjp(model, wrt="params", reduce="none", example_inputs=None if lazy else (x, mask))
    _, got = p(x, mask, w)
    f, flat = param_fn(model, (x, mask))
    J = torch.func.jacrev(f)(flat)  # [B, O, P]
    assert_close(got, torch.einsum("bop,bo->bp", J, w), "per-sample vjp through a rank branch")


class _Kept(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        return self.lin(x)


class _AfterALeaf(nn.Module):
    """A rank read and torch.is_tensor after a module kept whole (diffusers' attention after a leaf block, its
    UNet's ``if not torch.is_tensor(timesteps):``, torch_geometric's pooling after a leaf convolution)."""

    def __init__(self):
        super().__init__()
        self.kept, self.head = _Kept(), nn.Linear(4, 2)

    def forward(self, x, t):
        if not torch.is_tensor(t):
            t = torch.tensor([t], dtype=x.dtype)
        elif len(t.shape) == 0:  # (diffusers: a rank read through len, built at the first call too)
            t = t[None]
        h = self.kept(x)
        if h.ndim == 3:
            h = h.sum(-2 if h.dim() == 3 else -1)
        return self.head(h) * t[:, None]


@pytest.mark.parametrize("lazy", [True, False], ids=["built at the first call", "example_inputs"])
def test_ranks_after_a_leaf_module_and_is_tensor(lazy):
    # Probes BF, BG: a leaf module was not run while tracing, so no rank after it was known (a TraceError at
    # `if h.ndim == 3`), and torch.is_tensor of a traced input was False (forward took the branch for numbers).
    torch.manual_seed(0)
    model = _AfterALeaf().double()
    x, t, w = torch.randn(3, 5, 4, dtype=torch.float64), torch.rand(3, dtype=torch.float64), torch.randn(3, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the leaf's fallback warning
        p = fxjac.vjp(model, wrt="params", reduce="none", leaf_modules=[_Kept],
                      example_inputs=None if lazy else (x, t))
        _, got = p(x, t, w.double())
    f, flat = param_fn(model, (x, t))
    J = torch.func.jacrev(f)(flat)  # [B, O, P]
    assert_close(got, torch.einsum("bop,bo->bp", J, w.double()), "per-sample vjp after a leaf module")


class _SizeScaled(nn.Module):
    """``torch.tensor`` of a traced size: a factory node (torch.fx alone fails, and fxjac's message blamed packed
    sequences), as in attention's ``/ torch.tensor(d).sqrt()``."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3)

    def forward(self, x):
        h = self.lin(x)
        return h / torch.tensor(h.shape[-1], dtype=h.dtype, device=x.device).sqrt()


def test_torch_tensor_of_a_traced_size():
    torch.manual_seed(0)
    model = _SizeScaled().double()
    x, w = torch.randn(3, 4, dtype=torch.float64), torch.randn(3, 3, dtype=torch.float64)
    J = per_sample_jacobian(model, (x,))
    _, got = fxjac.vjp(model)(x, w)
    assert_close(got, torch.einsum("boi,bo->bi", J, w), "vjp through torch.tensor(h.shape[-1])")
    _, got = fxjac.jvp(model)(x, x)
    assert_close(got, torch.einsum("boi,bi->bo", J, x), "jvp through torch.tensor(h.shape[-1])")


class _ChecksIds(nn.Module):
    """Checks its token input's dtype; mean-pooled embeddings and a second, float input."""

    def __init__(self, untraceable=False):
        super().__init__()
        self.emb, self.lin = nn.Embedding(10, 4), nn.Linear(4, 3)
        self.untraceable = untraceable

    def forward(self, ids, x):
        if ids.dtype != torch.long:
            raise TypeError("ids must be torch.long")
        h = self.emb(ids).mean(1) + x
        if self.untraceable:
            h = h * len(x)  # a traced size as a Python number
        return self.lin(h)


def test_a_dtype_check_on_an_integer_input_waits_for_the_first_call():
    # Built without example_inputs, the options check traces with the model's floating dtype standing in for
    # every input's: that trace raised here, at construction; the first call now traces with the real dtypes.
    torch.manual_seed(0)
    model = _ChecksIds().double()
    ids, x = torch.randint(0, 10, (3, 5)), torch.randn(3, 4, dtype=torch.float64)
    w = torch.randn(3, 3, dtype=torch.float64)
    p = fxjac.vjp(model, wrt="params", reduce="none")
    y, got = p(ids, x, w)
    assert_close(y, model(ids, x), "primal")
    f, flat = param_fn(model, (ids, x))
    J = torch.func.jacrev(f)(flat).reshape(3, 3, -1)
    assert_close(got, torch.einsum("bop,bo->bp", J, w), "per-sample vjp after a dtype check")
    _, got = fxjac.jvp(model, wrt="input:1")(ids, x, w[:, :1].expand(3, 4))
    assert_close(got, model.lin(w[:, :1].expand(3, 4)) - model.lin.bias, "jvp w.r.t. the float input")
    with pytest.raises(fxjac.OptionError, match="input:2"):  # the inputs were still counted at construction
        fxjac.jvp(model, wrt="input:2")
    with pytest.raises(fxjac.TraceError, match="len"):  # a model that cannot be traced fails at its first call
        fxjac.vjp(_ChecksIds(untraceable=True).double(), wrt="params")(ids, x, w)


class _ChecksTensor(nn.Module):
    def __init__(self, skip_while_tracing):
        super().__init__()
        self.lin, self.skip = nn.Linear(4, 3), skip_while_tracing

    def forward(self, x):
        tracing = self.skip and torch.fx._symbolic_trace.is_fx_symbolic_tracing()
        if not tracing and not isinstance(x, torch.Tensor):
            raise TypeError("x must be a tensor")
        return self.lin(x)


class _AssertsTensor(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3)

    def forward(self, x):
        assert isinstance(x, torch.Tensor), "x must be a tensor"
        return self.lin(x)


def test_forward_checking_for_a_tensor_gets_a_hint_that_works():
    with pytest.raises(fxjac.TraceError, match="forward's own check raised TypeError(.|\n)*is_fx_symbolic_tracing"):
        fxjac.vjp(_ChecksTensor(False))
    with pytest.raises(fxjac.TraceError, match="own check raised AssertionError: x must(.|\n)*is_fx_symbolic_tracing"):
        fxjac.vjp(_AssertsTensor(), example_inputs=(torch.randn(2, 4),))
    model = _ChecksTensor(True).double()
    x, w = torch.randn(3, 4, dtype=torch.float64), torch.randn(3, 3, dtype=torch.float64)
    _, got = fxjac.vjp(model)(x, w)
    assert_close(got, w @ model.lin.weight, "vjp once the check is skipped while tracing")


class _IteratesChunks(nn.Module):
    """Iterates over tuples of tensors: chunks, splits, and a GRU cell stepped over ``x.unbind(1)``."""

    def __init__(self):
        super().__init__()
        self.a, self.cell, self.out = nn.Linear(3, 6), nn.GRUCell(6, 4), nn.Linear(4, 2)

    def forward(self, x):  # [B, T, 3]
        h = self.a(x)
        h = torch.cat([t.sin() * (i + 1) for i, t in enumerate(torch.chunk(h, 3, -1))], -1)
        h = torch.cat([p.tanh() for p in h.split(4, dim=-1)][::-1], -1)
        state = torch.zeros(x.shape[0], 4, dtype=x.dtype, device=x.device)
        for step in h.unbind(1):
            state = self.cell(step, state)
        return self.out(state)


@pytest.mark.parametrize("lazy", [True, False], ids=["built at the first call", "example_inputs"])
def test_iterating_over_a_tuple_of_tensors(lazy):
    # "Proxy object cannot be iterated" (probe MM): the tuple's length is read from its value on meta tensors.
    torch.manual_seed(0)
    model = _IteratesChunks().double()
    x, w = torch.randn(3, 5, 3, dtype=torch.float64), torch.randn(3, 2, dtype=torch.float64)
    with pytest.warns(UserWarning):  # the GRU cell's fallback
        p = fxjac.vjp(model, example_inputs=None if lazy else (x,))
        y, got = p(x, w)
    ref, pull = torch.func.vjp(model, x)
    assert_close(y, ref, "primal")
    assert_close(got, pull(w)[0], "vjp through the iterations")
    assert_close(p(x[:2], w[:2])[1], pull(w * torch.tensor([[1.0], [1.0], [0.0]], dtype=torch.float64))[0][:2],
                 "another batch size")


class _AutocastInside(nn.Module):
    def __init__(self, enabled=True):
        super().__init__()
        self.lin, self.out, self.enabled = nn.Linear(4, 3), nn.Linear(3, 2), enabled

    def forward(self, x):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.enabled):
            h = self.lin(x)
        return self.out(h.to(x.dtype))


def test_autocast_inside_forward_is_a_trace_error_that_names_it():
    """torch.fx does not record autocast: the product would compute in float32 where the model did not (it was the
    first call's output check's "mutation" message)."""
    x = torch.randn(3, 4)
    with pytest.raises(fxjac.TraceError, match="forward turns torch.autocast on or off .*h = self.lin"):
        fxjac.vjp(_AutocastInside())(x, torch.randn(3, 2))
    model = _AutocastInside(enabled=False).double()  # autocast off, as outside: nothing to record
    x, w = x.double(), torch.randn(3, 2, dtype=torch.float64)
    _, got = fxjac.vjp(model)(x, w)
    assert_close(got, torch.func.vjp(model, x)[1](w)[0], "vjp with autocast turned off in forward")


class _MaskedThenUpcast(nn.Module):
    """LLaMA-style: a causal mask from a traced size, a padding mask cast to x's dtype, then a dtype branch."""

    def __init__(self, mode):
        super().__init__()
        self.lin, self.mode = nn.Linear(4, 4), mode

    def forward(self, x, am):
        t = x.shape[1]
        if self.mode == "triu":
            h = x.masked_fill(torch.triu(torch.ones(t, t, dtype=torch.bool), diagonal=1)[None, :, :1], 0.0)
        else:
            h = x * am[:, :, None].to(x.dtype)
        if h.dtype != torch.float64:  # an RMSNorm's upcast
            h = h.to(torch.float32)
        return self.lin(h)


@pytest.mark.parametrize("mode", ["triu", "cast"])
def test_a_dtype_read_after_a_factory_or_after_an_earlier_read_traces(mode):
    """Probe WW: a factory sized by a traced size made a real tensor among the meta ones, and a second dtype read
    gave the second input the first one's example: both left ``h.dtype`` a traced value (a TraceError)."""
    model = _MaskedThenUpcast(mode).double()
    x, am = torch.randn(2, 3, 4, dtype=torch.float64), torch.tensor([[1, 1, 0], [1, 0, 0]])
    _, got = fxjac.jacobian(model, example_inputs=(x, am))(x, am)
    J = torch.func.jacrev(lambda u: model(u, am))(x)  # [2, 3, 4, 2, 3, 4]
    ref = torch.stack([J[b, :, :, b].reshape(12, 12) for b in range(2)])
    assert_close(got, ref, f"jacobian through the {mode} mask")


class _SizesAsNumbers(nn.Module):
    """Sizes used as Python numbers, as Hugging Face's models use them: a branch on the query length (sdpa's
    ``q_length > 1``), arithmetic on a mask's length (masking_utils' ``kv_length + kv_offset - mask.shape[-1]``), a
    channel check that raises, ``torch.arange`` of a length, a loop over time steps (an unrolled GRU cell), and a
    value whose batch is its second axis (time-major), whose ``shape[1]`` must stay the batch's."""

    def __init__(self):
        super().__init__()
        self.pos, self.qkv, self.cell, self.head = nn.Embedding(8, 4), nn.Linear(4, 12), nn.GRUCell(4, 4), \
            nn.Linear(8, 3)

    def forward(self, x, mask):
        b, t, d = x.shape
        if d != 4:
            raise ValueError(f"expected 4 channels, got {d}")
        h = x + self.pos(torch.arange(t, device=x.device))
        q, k, v = self.qkv(h).view(b, t, 3, 4).unbind(2)
        pad = t - mask.shape[-1]  # 0: the mask covers every key
        keep = F.pad(mask, (pad, 0), value=1.0)[:, None, :] > 0
        if t > 1:
            keep = keep & torch.ones(t, t, dtype=torch.bool, device=x.device).tril()
        att = (q @ k.transpose(-1, -2)).masked_fill(~keep, float("-inf")).softmax(-1) @ v
        steps = att.transpose(0, 1)  # [T, B, 4]
        s = steps.new_zeros(steps.shape[1], steps.size(-1))  # the batch's size: traced
        for i in range(steps.shape[0]):
            s = self.cell(steps[i], s)
        return self.head(torch.cat([s, att.mean(1)], -1))


@pytest.mark.parametrize("lazy", [True, False], ids=["built at the first call", "example_inputs"])
def test_sizes_other_than_the_batch_are_numbers_while_tracing(lazy):
    # Probe BI: every size was a traced value, so Hugging Face's masks, `if q_len > 1:` and channel checks were
    # TraceErrors (the backbone had to be a leaf). Built at one batch size, called at another.
    torch.manual_seed(0)
    model = _SizesAsNumbers().double()

    def inputs(b):
        mask = torch.ones(b, 5, dtype=torch.float64)
        mask[0, -2:] = 0.0  # right padding: every query keeps a key
        return torch.randn(b, 5, 4, dtype=torch.float64), mask

    x, mask = inputs(3)
    ggn = fxjac.ggn(model, loss="mse", out="diag", example_inputs=None if lazy else inputs(2))
    vjp = fxjac.vjp(model, wrt="params", reduce="none", example_inputs=None if lazy else inputs(2))
    w = torch.randn(3, 3, dtype=torch.float64)
    y, got = vjp(x, mask, w)
    assert_close(y, model(x, mask), "primal")
    f, flat = param_fn(model, (x, mask))
    J = torch.func.jacrev(f)(flat)  # [B, O, P]
    assert_close(got, torch.einsum("bop,bo->bp", J, w), "per-sample vjp with sizes as numbers")
    assert_close(ggn(x, mask)[1], torch.einsum("bop,bop->p", J, J), "GGN diagonal with sizes as numbers")
    J_in = per_sample_jacobian(model, (x, mask))
    _, got = fxjac.jvp(model)(x, mask, x)
    assert_close(got, torch.einsum("boi,bi->bo", J_in, x.reshape(3, -1)), "jvp w.r.t. the input")
    with pytest.raises(fxjac.ShapeError):  # built for 5 time steps
        vjp(torch.randn(3, 6, 4, dtype=torch.float64), torch.ones(3, 6, dtype=torch.float64), w)


def test_the_batch_size_as_a_number_gets_a_hint():
    class PerSample(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 3)

        def forward(self, x):
            return torch.stack([self.lin(x[i]) for i in range(x.shape[0])])

    with pytest.raises(fxjac.TraceError, match=r"Hint: torch.fx traces sizes symbolically.*range\(x.shape\[0\]\)"):
        fxjac.vjp(PerSample(), wrt="params", example_inputs=(torch.randn(2, 3),))

    class SizeOfShape(nn.Module):
        def forward(self, x):
            return x.view(torch.Size(x.shape[:1] + (-1,)))

    with pytest.raises(fxjac.TraceError, match=r"which torch.Size cannot hold: pass the tuple itself"):
        fxjac.vjp(SizeOfShape(), example_inputs=(torch.randn(2, 3),))


class _PadsRows(nn.Module):
    """The flattened batch padded to a multiple of 16 rows, scaled by the padded count: 16 rows at two samples and
    at three, 32 at six (probe CB: a size equal at B and B + 1 that follows the batch)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        b, t, d = x.shape
        h = self.lin(x).reshape(-1, d)
        n = h.shape[0]
        h = F.pad(h, (0, 0, 0, (16 - n % 16) % 16))
        return (h * h.shape[0] ** -0.5)[:n].view(b, t, d) * x.shape[1:].numel() / (x.shape[1:] + (1,)).numel()


class _ReadsADict(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x, d):
        w = d["w"]
        return self.lin(x) * w.sum(1, keepdim=True) / w.shape[1]


def test_sizes_rounded_with_the_batch_stay_traced_and_nested_inputs_are_checked():
    # Probes CA, CB: a size rounded to a multiple was a number of the product (wrong results at six samples, built
    # at two); a size of a tensor inside a dict input was a number, and a call with another one gave wrong results
    # (only top-level inputs were checked); x.shape[1:].numel() was refused (a slice of the sizes was a tuple).
    torch.manual_seed(0)
    model = _PadsRows().double()
    p = fxjac.jvp(model, example_inputs=(torch.randn(2, 3, 4, dtype=torch.float64),))
    for b in (2, 6):
        x, v = torch.randn(b, 3, 4, dtype=torch.float64), torch.randn(b, 3, 4, dtype=torch.float64)
        y, got = p(x, v)
        ref_y, ref = torch.func.jvp(model, (x,), (v,))
        assert_close(y, ref_y, f"primal at batch {b}")
        assert_close(got, ref, f"jvp at batch {b}")
    model = _ReadsADict().double()
    x, v = torch.randn(2, 4, dtype=torch.float64), torch.randn(2, 4, dtype=torch.float64)
    p = fxjac.jvp(model, example_inputs=(x, {"w": torch.ones(2, 5, dtype=torch.float64)}))
    _, got = p(x, {"w": torch.ones(3, 5, dtype=torch.float64)[:2]}, v)
    assert_close(got, model.lin(v) - model.lin.bias, "jvp with a dict input")
    with pytest.raises(fxjac.ShapeError, match=r"input 1\['w'\] has shape \(2, 7\); this product was built for"):
        p(x, {"w": torch.ones(2, 7, dtype=torch.float64)}, v)


class _Scaled(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3)

    def forward(self, x, scale=None):
        return self.lin(x) * scale


class _Unpacks(nn.Module):
    """``model(**batch)``: a dict input unpacked into a module's keyword arguments (a Hugging Face training
    step's wrapper)."""

    def __init__(self):
        super().__init__()
        self.inner = _Scaled()

    def forward(self, batch):
        return self.inner(**batch)


@pytest.mark.parametrize("lazy", [True, False], ids=["built at the first call", "example_inputs"])
def test_a_dict_input_unpacked_into_keyword_arguments(lazy):
    # Probe CA: `**batch` on a traced dict was a TraceError (torch.fx cannot iterate its keys) with the sizes hint.
    torch.manual_seed(0)
    model = _Unpacks().double()
    batch = {"x": torch.randn(3, 4, dtype=torch.float64), "scale": torch.rand(3, 1, dtype=torch.float64)}
    w = torch.randn(3, 3, dtype=torch.float64)
    p = fxjac.vjp(model, wrt="params", example_inputs=None if lazy else (batch,))
    y, got = p(batch, w)
    assert_close(y, model(batch), "primal")
    params = dict(model.named_parameters())
    _, pull = torch.func.vjp(lambda ps: torch.func.functional_call(model, ps, (batch,)), params)
    ref = pull(w)[0]
    assert_close(got, torch.cat([ref[k].flatten() for k in params]), "summed vjp through **batch")


class _ReadsAFlag(nn.Module):
    """Longformer's ``is_global_attn = (mask > 0).flatten().any().item()`` (meta tensors cannot give it), then a
    size check on a value that does not depend on it."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x, mask):
        flag = (mask > 0).flatten().any().item()  # noqa: F841 - read, not used
        h = self.lin(x)
        if h.shape[-1] != 4:
            raise ValueError("wrong size")
        return h


def test_a_value_meta_tensors_cannot_give_leaves_other_sizes_known():
    # Probe CC: one node the meta runs could not compute (.item(), a leaf that selects by values) made every later
    # size traced, so an unrelated size check was a TraceError.
    torch.manual_seed(0)
    model = _ReadsAFlag().double()
    x, mask = torch.randn(2, 3, 4, dtype=torch.float64), torch.ones(2, 3, dtype=torch.long)
    w = torch.randn(2, 3, 4, dtype=torch.float64)
    _, got = fxjac.vjp(model, wrt="params", reduce="none", example_inputs=(x, mask))(x, mask, w)
    f, flat = param_fn(model, (x, mask))
    J = torch.func.jacrev(f)(flat).reshape(2, 12, -1)  # [B, O, P]
    assert_close(got, torch.einsum("bop,bo->bp", J, w.reshape(2, -1)), "per-sample vjp after an .item()")


class _ReadsATuple(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3)

    def forward(self, x, extra):
        return self.lin(x) * extra[0] + extra[1]


@dataclasses.dataclass
class _Batch:
    w: torch.Tensor


class _ReadsADataclass(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.register_buffer("proto", torch.linspace(-1.0, 1.0, 12).reshape(3, 4))

    def forward(self, x, d):
        w = d.w
        h = self.lin(x) * w.sum(1, keepdim=True) / w.shape[1] + w.reshape(w.shape[0], -1)[:, :4]
        return h + (h[:, None, :] * self.proto).sum(1) / self.proto.shape[0]


def test_sizes_from_a_dataclass_input_or_a_buffer_and_a_structure_unrolled_from_an_input():
    # Probe CE: a dataclass input's tensors were not grown by the runs on meta tensors, so every size of theirs
    # looked fixed, the batch's too (wrong results at another batch size); a buffer replaced by one of another
    # shape kept the old size; a dict input's keys (**batch) and a list's length were unrolled and not checked.
    torch.manual_seed(0)
    model = _ReadsADataclass().double()
    p = fxjac.jvp(model, example_inputs=(torch.randn(2, 4, dtype=torch.float64), _Batch(torch.randn(2, 5))))
    x, v, d = (torch.randn(3, 4, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64),
               _Batch(torch.randn(3, 8, dtype=torch.float64)))
    batch = _Batch(torch.randn(3, 5, dtype=torch.float64))
    y, got = p(x, batch, v)
    ref_y, ref = torch.func.jvp(lambda u: model(u, batch), (x,), (v,))
    assert_close(y, ref_y, "primal with a dataclass input")
    assert_close(got, ref, "jvp with a dataclass input")
    with pytest.raises(fxjac.ShapeError, match=r"input 1.w has shape \(3, 8\); this product was built for \[B, 5\]"):
        p(x, d, v)
    model.proto = torch.ones(5, 4, dtype=torch.float64)
    with pytest.raises(fxjac.StaleProductError, match=r"'proto' has shape \(5, 4\) but this product was built "
                                                      r"for \(3, 4\)"):
        p(x, d, v)
    model = _Unpacks().double()
    batch = {"x": torch.randn(3, 4, dtype=torch.float64), "scale": torch.rand(3, 1, dtype=torch.float64)}
    p = fxjac.vjp(model, wrt="params", example_inputs=(batch,))
    with pytest.raises(fxjac.ShapeError, match=r"input 0 is a dict with keys \['x'\]; this product was built for a "
                                               r"dict with keys \['x', 'scale'\]"):
        p({"x": batch["x"]}, torch.randn(3, 3, dtype=torch.float64))
    # a tuple at the build, a list at the call (a DataLoader's collate makes lists): the same layout
    model = _ReadsATuple().double()
    x = torch.randn(3, 4, dtype=torch.float64)
    extra = [torch.randn(3, 3, dtype=torch.float64), torch.randn(3, 3, dtype=torch.float64)]
    p = fxjac.jvp(model, example_inputs=(x[:2], tuple(e[:2] for e in extra)))
    _, got = p(x, extra, x)
    assert_close(got, (x @ model.lin.weight.T) * extra[0], "jvp with a list where a tuple was built")
