"""torch.compile on every product kind: one graph (fullgraph=True), no recompilation when the batch size changes,
the eager numbers within float32 rounding.

Batch sizes (5, 7) differ from every model width (4, 8, 3) and from K (2): torch.compile's duck sizing would give
a batch equal to a width the same symbol and specialise it (one extra recompilation, not fxjac's doing).
"""

import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch._dynamo.utils import counters

import fxjac

TOL = 1e-5  # float32, compiled vs eager
BATCHES = (5, 7)


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).eval()


def _operands(name, batch, n_params, g):
    def r(*s):
        return torch.randn(*s, generator=g)

    return {"jvp": (r(batch, 4),), "vjp": (r(batch, 3),), "jmp": (r(batch, 4, 2),), "mjp": (r(batch, 2, 3),),
            "jacobian": (), "jtmjp": (), "jmjtp": (r(n_params).abs(),), "ggn": ()}[name]


CASES = [
    ("jvp", dict(wrt="input")),
    ("vjp", dict(wrt="params")),
    ("jmp", dict(wrt="input")),
    ("mjp", dict(wrt="input")),
    ("jacobian", dict(wrt="params")),
    ("jtmjp", dict(wrt="params", out="diag")),
    ("jmjtp", dict(wrt="params", matrix="diag", out="diag")),
    ("ggn", dict(out="diag")),
]


def _close(got, ref):
    got, ref = (got if isinstance(got, (list, tuple)) else [got]), (ref if isinstance(ref, (list, tuple)) else [ref])
    for a, b in zip(got, ref):
        err = (a - b).abs().max().item()
        assert err <= TOL * max(1.0, b.abs().max().item()), f"compiled differs from eager by {err:.3g}"


@pytest.mark.parametrize("name,options", CASES, ids=[c[0] for c in CASES])
def test_product_compiles_fullgraph_with_changing_batch(name, options):
    model = _model()
    n_params = sum(p.numel() for p in model.parameters())
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(BATCHES[0], 4, generator=g)
    p = fxjac.compile(model, name, example_inputs=(x0,), **options)
    torch._dynamo.reset()  # compiled before any eager call: the eager-only first-call checks stay out
    counters.clear()
    compiled = torch.compile(p, backend="aot_eager", fullgraph=True, dynamic=True)
    for batch in BATCHES:
        x = torch.randn(batch, 4, generator=g)
        ops = _operands(name, batch, n_params, g)
        y, res = compiled(x, *ops)
        y_ref, res_ref = p(x, *ops)
        _close(y, y_ref)
        _close(res, res_ref)
    assert counters["stats"]["unique_graphs"] == 1, f"recompiled: {dict(counters['stats'])}"
    assert not counters["graph_break"], dict(counters["graph_break"])


@pytest.mark.parametrize("out", ["diag", "block"])
def test_column_loop_compiles_fullgraph_with_changing_batch(out):
    # K = 3 MSE columns two at a time: dynamo unrolls the column loop (its trip count is fixed at build time),
    # the padded last chunk included
    model = _model()
    g = torch.Generator().manual_seed(2)
    p = fxjac.ggn(model, loss="mse", out=out, chunk_size=2, example_inputs=(torch.randn(BATCHES[0], 4),))
    assert "column_loop_0(" in p.code
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(p, backend="aot_eager", fullgraph=True, dynamic=True)
    for batch in BATCHES:
        x = torch.randn(batch, 4, generator=g)
        _close(compiled(x)[1], fxjac.ggn(model, loss="mse", out=out)(x)[1])
    assert counters["stats"]["unique_graphs"] == 1, f"recompiled: {dict(counters['stats'])}"
    assert not counters["graph_break"], dict(counters["graph_break"])


def test_column_loop_compiles_the_wide_variant():
    # A net with convolutions whose per-column stacks outgrow the CPU's chunk budget: eagerly one column at a
    # time, under torch.compile (which unrolls the loop) the one wide chunk of the second variant.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(8 * 32 * 32, 3))
    x = torch.randn(80, 1, 32, 32)
    p = fxjac.ggn(model, loss="mse", out="diag", example_inputs=(x,))
    assert p.column_loop_0.widths == [1, 3]
    torch._dynamo.reset()
    counters.clear()
    got = torch.compile(p, backend="aot_eager", fullgraph=True, dynamic=True)(x)[1]
    _close(got, p(x)[1])
    _close(got, fxjac.ggn(model, loss="mse", out="diag", chunk_size=3)(x)[1])
    assert not counters["graph_break"], dict(counters["graph_break"])


@pytest.mark.parametrize("name, options", [("vjp", dict(wrt="params", reduce="none")),
                                           ("ggn", dict(loss="cross_entropy", out="diag")),
                                           ("jacobian", dict(wrt="params"))])
def test_pointwise_convolution_products_compile(name, options):
    """A stride-1 1x1 convolution's patches are a view of its input: the eager-kernel custom op returns a copy
    (a custom op's result may not alias its inputs; compiling failed).
    """
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 1), nn.Tanh(), nn.Conv2d(3, 2, 1), nn.Flatten(), nn.Linear(18, 3))
    g = torch.Generator().manual_seed(6)
    p = getattr(fxjac, name)(model, example_inputs=(torch.randn(BATCHES[0], 2, 3, 3, generator=g),), **options)
    torch._dynamo.reset()
    compiled = torch.compile(p, backend="aot_eager", fullgraph=True, dynamic=True)
    for batch in BATCHES:
        x = torch.randn(batch, 2, 3, 3, generator=g)
        ops = (torch.randn(batch, 3, generator=g),) if name == "vjp" else ()
        _close(compiled(x, *ops)[1], p(x, *ops)[1])


def test_per_sample_tangents_compile():
    """A jvp w.r.t. the parameters with per-sample tangents ``[B, P]`` runs a sibling product: compiled too,
    through torch.compile after an eager call of that form, and through fxjac.compile from its first call.
    """
    model = _model()
    n_params = sum(q.numel() for q in model.parameters())
    p = fxjac.jvp(model, wrt="params")
    x, v = torch.randn(BATCHES[0], 4), torch.randn(BATCHES[0], n_params)
    p(x, v)
    torch._dynamo.reset()
    compiled = torch.compile(p, backend="aot_eager", fullgraph=True, dynamic=True)
    via_fxjac = fxjac.compile(model, "jvp", wrt="params", backend="aot_eager")
    for batch in BATCHES:
        x, v = torch.randn(batch, 4), torch.randn(batch, n_params)
        ref = p(x, v)[1]
        _close(compiled(x, v)[1], ref)
        _close(via_fxjac(x, v)[1], ref)
        _close(via_fxjac(x, v[0])[1], p(x, v[0])[1])  # and the shared [P] form next to it


def test_fxjac_compile_breaks_the_graph_around_an_rnn():
    """torch.compile refuses to trace nn.LSTM (fullgraph=True fails): fxjac.compile compiles around it."""
    torch.manual_seed(0)

    class Tagger(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn, self.fc = nn.LSTM(3, 4, batch_first=True), nn.Linear(4, 2)

        def forward(self, x):
            return self.fc(torch.tanh(self.rnn(x)[0][:, -1]))

    model = Tagger()
    torch._dynamo.reset()
    compiled = fxjac.compile(model, "vjp", wrt="params", backend="aot_eager")
    p = fxjac.vjp(model, wrt="params")
    for batch in BATCHES:
        x, w = torch.randn(batch, 5, 3), torch.randn(batch, 2)
        _close(compiled(x, w)[1], p(x, w)[1])


class _Positions(nn.Module):
    """A Linear on ``[B, T, d]`` (its weight read at T positions per sample) and one on ``[B, d]``."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 8)
        self.b = nn.Linear(8, 3)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)).mean(1))


@pytest.mark.parametrize("name", ["vjp", "mjp"])
@pytest.mark.parametrize("positions", [False, True], ids=["mlp", "positions"])
def test_per_sample_parameter_products_compile_fullgraph(name, positions):
    """The flat result written block by block (Note [flat writes]): out= is eager-only, compiled it is a copy."""
    torch.manual_seed(0)
    model = _Positions().eval() if positions else _model()
    shape = (6, 4) if positions else (4,)
    n_params = sum(p.numel() for p in model.parameters())
    g = torch.Generator().manual_seed(1)
    p = getattr(fxjac, name)(model, wrt="params", reduce="none",
                             example_inputs=(torch.randn(BATCHES[0], *shape, generator=g),))
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(p, backend="aot_eager", fullgraph=True, dynamic=True)
    for batch in BATCHES:
        x = torch.randn(batch, *shape, generator=g)
        ops = _operands(name, batch, n_params, g)
        _close(compiled(x, *ops)[1], p(x, *ops)[1])
    assert counters["stats"]["unique_graphs"] == 1, f"recompiled: {dict(counters['stats'])}"
    assert not counters["graph_break"], dict(counters["graph_break"])


def test_flat_writes_compile_to_the_eager_stack():
    """A tied parameter's second store adds to the first; unreached blocks are zeros; compiled or not."""
    from fxjac.assemble import flat_block, flat_done, flat_empty, flat_store, flat_zero

    def stack(a, b, c):
        s = flat_empty(a.shape[0], 9, a)
        first = flat_store(flat_block(s, 0, 4), a, None)
        tied = flat_store(flat_block(s, 0, 4), b, first)
        other = flat_store(flat_block(s, 4, 3), c, None)
        return flat_done(s, tied, other, flat_zero(flat_block(s, 7, 2)))

    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(stack, backend="aot_eager", fullgraph=True, dynamic=True)
    for batch in BATCHES:
        a, b, c = torch.randn(batch, 2, 2), torch.randn(batch, 2, 2), torch.randn(batch, 3)
        ref = torch.cat([(a + b).reshape(batch, 4), c, torch.zeros(batch, 2)], 1)
        _close(stack(a, b, c), ref)
        _close(compiled(a, b, c), ref)
    assert not counters["graph_break"], dict(counters["graph_break"])


def test_fxjac_compile_backend_with_example_inputs():
    model = _model()
    x = torch.randn(BATCHES[0], 4)
    torch._dynamo.reset()
    compiled = fxjac.compile(model, "jtmjp", wrt="params", out="block", example_inputs=(x,), backend="eager")
    eager = fxjac.jtmjp(model, wrt="params", out="block")
    for batch in BATCHES:
        x = torch.randn(batch, 4)
        _close(compiled(x)[1], eager(x)[1])


def test_fxjac_compile_lazy_product():
    """Built without example_inputs: fxjac.compile builds it at the first call, then runs it compiled."""
    model = _model()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        compiled = fxjac.compile(model, "vjp", wrt="params", backend="eager")
    torch._dynamo.reset()
    x, w = torch.randn(5, 4), torch.randn(5, 3)
    y, g = compiled(x, w)
    assert g.shape == (sum(p.numel() for p in model.parameters()),)
    x, w = torch.randn(7, 4), torch.randn(7, 3)
    _close(compiled(x, w)[1], fxjac.vjp(model, wrt="params")(x, w)[1])


@pytest.mark.compile
@pytest.mark.parametrize("reduce", ["sum", "none"])
def test_inductor_vjp(reduce):
    model = _model()
    x = torch.randn(BATCHES[0], 4)
    p = fxjac.vjp(model, wrt="params", reduce=reduce, example_inputs=(x,))
    torch._dynamo.reset()
    compiled = torch.compile(p, backend="inductor", fullgraph=True, dynamic=True)
    for batch in BATCHES:
        x, w = torch.randn(batch, 4), torch.randn(batch, 3)
        _close(compiled(x, w)[1], p(x, w)[1])


class _ConvPool(nn.Module):
    """conv → ReLU → max pool → conv → ReLU → max pool → linear: im2col patches, max-pool scatters and ReLU
    masks. The first convolution's weight cotangents skip its pooling's scatter (Note [weight cotangents through
    a max pooling]); the second pooling's scatter stays (its convolution's input needs the cotangent).
    """

    def __init__(self):
        super().__init__()
        # 8 channels into the pooling: it runs through the channels-last kernel (Note [channels-last max pooling])
        self.c1, self.c2, self.fc = nn.Conv2d(2, 8, 3, padding=1), nn.Conv2d(8, 3, 3), nn.Linear(3, 3)

    def forward(self, x):
        h = F.max_pool2d(torch.relu(self.c1(x)), 2)
        return self.fc(F.max_pool2d(torch.relu(self.c2(h)), 2).flatten(1))


class _ConvKinds(nn.Module):
    """A 'same'-padded dilated Conv1d, a grouped ConvTranspose2d with output padding, a strided Conv3d."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv1d(2, 4, 3, padding="same", dilation=2)
        self.t2 = nn.ConvTranspose2d(4, 4, 3, stride=2, output_padding=1, groups=2)
        self.c3 = nn.Conv3d(1, 2, 2, stride=2, bias=False)
        self.fc = nn.Linear(4 * 2 * 2 + 16, 3)

    def forward(self, x):
        h = torch.tanh(self.c1(x))  # [B, 4, 6]
        u = self.t2(h.unsqueeze(-1))  # [B, 4, 14, 2]
        v = self.c3(u[:, :, :4].unsqueeze(1))  # [B, 2, 2, 2, 1]
        return self.fc(torch.cat([v.flatten(1), u[:, :, :2, 0].flatten(1).tanh(), h[:, :, :2].flatten(1)], 1)[:, :32])


@pytest.mark.parametrize("name, options", [("jvp", dict(wrt="params")), ("vjp", dict(wrt="input")),
                                           ("ggn", dict(loss="cross_entropy", out="diag")),
                                           ("jmjtp", dict(wrt="params", matrix="diag"))])
def test_convolutions_are_custom_ops_under_compile(name, options):
    """Note [convolutions under torch.compile]: no convolution of a product reaches inductor as ``aten`` (whose
    layout pass would turn the graph channels-last on a CPU); string padding, transposed, grouped and 3-d ones
    give eager numbers, the batch changing.
    """
    torch.manual_seed(0)
    model = _ConvKinds().double().eval()
    g = torch.Generator().manual_seed(5)
    p = getattr(fxjac, name)(model, example_inputs=(torch.randn(3, 2, 6, generator=g, dtype=torch.float64),),
                             **options)
    seen = set()

    def backend(gm, example_inputs):
        seen.update(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm.forward

    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(p, backend=backend, fullgraph=True, dynamic=True)
    n_params = sum(q.numel() for q in model.parameters())
    for batch in (3, 4):
        x = torch.randn(batch, 2, 6, generator=g, dtype=torch.float64)
        ops = {"jvp": (torch.randn(n_params, generator=g, dtype=torch.float64),),
               "vjp": (torch.randn(batch, 3, generator=g, dtype=torch.float64),),
               "jmjtp": (torch.rand(n_params, generator=g, dtype=torch.float64),)}.get(name, ())
        _close(compiled(x, *ops)[1], p(x, *ops)[1])
    convs = {t for t in seen if "conv" in t and "backward" not in t}  # the backward is no layout cue
    assert convs == {"fxjac.convolution.default"}, convs
    assert not counters["graph_break"], dict(counters["graph_break"])


@pytest.mark.parametrize("name, options", [("ggn", dict(loss="cross_entropy", out="diag")),
                                           ("vjp", dict(wrt="params", reduce="none")),
                                           ("vjp", dict(wrt="params", differentiable=True))])
def test_eager_kernels_stay_custom_ops_under_compile(name, options):
    """Note [eager kernels under torch.compile]: the channels-last max pooling, the max-pool scatter, the im2col
    patches and ReLU's mask written into its cotangent are custom ops in the compiled graph, with shapes that
    follow the batch, and so are the flat stack's allocation and writes (Note [flat writes under torch.compile]);
    differentiable products keep the plain ops (the custom ops have no derivative), gradients included.
    """
    torch.manual_seed(0)
    model = _ConvPool().eval()
    g = torch.Generator().manual_seed(2)
    p = getattr(fxjac, name)(model, example_inputs=(torch.randn(6, 2, 8, 8, generator=g),), **options)
    seen = set()

    def backend(gm, example_inputs):
        seen.update(str(n.target).split(".")[1] for n in gm.graph.nodes if str(n.target).startswith("fxjac."))
        return gm.forward

    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(p, backend=backend, fullgraph=True, dynamic=True)
    differentiable = options.get("differentiable", False)
    for batch in (6, 7):  # 3·batch ≥ 16 for both: fake convolution guards on it (a PyTorch choice)
        x = torch.randn(batch, 2, 8, 8, generator=g)
        ops = () if name == "ggn" else (torch.randn(batch, 3, generator=g, requires_grad=differentiable),)
        got, ref = compiled(x, *ops)[1], p(x, *ops)[1]
        _close(got.detach(), ref.detach())
        if differentiable:  # the writes into the flat stack stay on autograd's tape
            (g_got,), (g_ref,) = (torch.autograd.grad((r * r).sum(), ops) for r in (got, ref))
            _close(g_got, g_ref)
    # per-sample weight cotangents of the 2-channel convolution come from patches; the flat stack is allocated by
    # a custom op (no tensor input, nothing to differentiate) and written by one where autograd records nothing;
    # every convolution is one too, so that inductor keeps eager code's layout (Note [convolutions under
    # torch.compile]), and so is ATen's convolution backward (its lowering makes the groups a constant)
    want = {"flat_empty"} if differentiable else {"max_pool_channels_last", "pool_scatter", "relu_mask_", "patches",
                                                  "flat_empty", "write_into", "convolution", "conv_backward"}
    assert seen == want, seen
    assert counters["stats"]["unique_graphs"] == 1, f"recompiled: {dict(counters['stats'])}"
    assert not counters["graph_break"], dict(counters["graph_break"])


@pytest.mark.parametrize("name, options", [("ggn", dict(loss="cross_entropy", out="diag")),
                                           ("jmjtp", dict(wrt="params", matrix="diag")),
                                           ("jmjtp", dict(wrt="params", matrix="diag", out="diag"))])
def test_shared_weight_contractions_compile_fullgraph(name, options):
    """A Linear on ``[B, T, d]`` (its weight read at T positions): the sample-major contractions compile to one
    graph (in one piece, where eager code forms them a few samples at a time)."""
    torch.manual_seed(0)
    model = _Positions().eval()
    n_params = sum(p.numel() for p in model.parameters())
    g = torch.Generator().manual_seed(3)
    p = getattr(fxjac, name)(model, example_inputs=(torch.randn(BATCHES[0], 6, 4, generator=g),), **options)
    assert "linear_weight_shared" in p.code
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(p, backend="aot_eager", fullgraph=True, dynamic=True)
    for batch in BATCHES:
        x = torch.randn(batch, 6, 4, generator=g)
        ops = () if name == "ggn" else (torch.rand(n_params, generator=g),)
        _close(compiled(x, *ops)[1], p(x, *ops)[1])
    assert counters["stats"]["unique_graphs"] == 1, f"recompiled: {dict(counters['stats'])}"
    assert not counters["graph_break"], dict(counters["graph_break"])


class _WithFallbackOps(nn.Module):
    """A net with ops that have no structured rule (``addmm``, ``cummax``): the autograd fallback."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 6)

    def forward(self, x):
        h = torch.addmm(self.fc.bias, x, self.fc.weight.t())
        return torch.cummax(torch.tanh(h), -1).values


@pytest.mark.compile
def test_fallback_ops_compile_fullgraph():
    # The fallback names its op by a string in the generated code; under torch.compile it is looked up in a
    # table filled at build time (importlib cannot be traced).
    model = _WithFallbackOps()
    x = torch.randn(BATCHES[0], 4)
    p = fxjac.mjp(model, wrt="params", example_inputs=(x,))
    torch._dynamo.reset()
    compiled = torch.compile(p, backend="inductor", fullgraph=True, dynamic=True)
    for batch in BATCHES:
        x, m = torch.randn(batch, 4), torch.randn(batch, 2, 6)
        _close(compiled(x, m)[1], p(x, m)[1])


class _Leaf(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.linspace(0.5, 1.5, 5))

    def forward(self, h):
        return torch.sin(h * self.w) + h.cumsum(-1) * 0.1


@pytest.mark.parametrize("name, options, operand", [
    ("jmp", dict(wrt="params"), lambda b, p: torch.randn(p, 3)),
    ("jmp", dict(wrt="input"), lambda b, p: torch.randn(b, 3, 2)),
    ("jvp", dict(wrt="params"), lambda b, p: torch.randn(b, p)),  # per-sample tangents: a vmap over the batch
])
def test_fallback_tangents_of_several_columns_compile(name, options, operand):
    """The fallback's forward mode inside a vmap over columns or samples fails in dynamo's fake tensors (torch
    2.13); under torch.compile those tangents come from reverse mode (found by a probe: a leaf module)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), _Leaf(), nn.Linear(5, 4)).eval()
    n_params = sum(q.numel() for q in model.parameters())
    p = getattr(fxjac, name)(model, leaf_modules=[_Leaf], example_inputs=(torch.randn(BATCHES[0], 3),), **options)
    assert p.fallback_ops
    p(torch.randn(BATCHES[0], 3), operand(BATCHES[0], n_params))  # [B, P] tangents: a sibling built eagerly first
    torch._dynamo.reset()
    compiled = torch.compile(p, backend="aot_eager", fullgraph=True, dynamic=True)
    for batch in BATCHES:
        x, m = torch.randn(batch, 3), operand(batch, n_params)
        _close(compiled(x, m)[1], p(x, m)[1])


class _Inverse(nn.Module):
    def __init__(self):
        super().__init__()
        self.W = nn.Parameter(torch.randn(3, 3, dtype=torch.float64))

    def forward(self, x):
        return torch.linalg.inv(x.view(-1, 3, 3) @ self.W + 3 * torch.eye(3, dtype=x.dtype)).flatten(1)


def test_fallback_tangent_of_one_column_compiles_with_a_symbolic_batch():
    # Probe ZZ: forward mode through linalg.inv (the fallback) failed in dynamo's fake tensors at the second batch
    # size ("Cannot call storage_offset() on tensor with symbolic sizes"); under torch.compile every fallback
    # tangent now comes from reverse mode.
    torch.manual_seed(0)
    model = _Inverse()
    compiled = fxjac.compile(model, "jvp", wrt="input", backend="eager")
    for batch in BATCHES:
        x, v = torch.randn(batch, 9, dtype=torch.float64), torch.randn(batch, 9, dtype=torch.float64)
        _close(compiled(x, v)[1], torch.func.jvp(model, (x,), (v,))[1])


class _SpectralConv(nn.Module):
    """A Fourier layer (FNO): the lowest modes of rfft2 times a weight, written into zeros, back through irfft2."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(2, 2))

    def forward(self, x):
        xf = torch.fft.rfft2(x)
        out = torch.zeros_like(xf)
        out[:, :2, :2] = xf[:, :2, :2] * self.w
        return torch.fft.irfft2(out, s=(4, 4))


@pytest.mark.parametrize("wrt", ["params", "input"])
def test_fallback_cotangent_of_one_column_compiles_with_a_symbolic_batch(wrt):
    # vmap over one cotangent column through index_put and irfft2's derivatives failed in dynamo's fake tensors
    # with a symbolic batch size (probe FF); one column is now one call, no vmap.
    torch.manual_seed(0)
    model = _SpectralConv().double()
    p = fxjac.vjp(model, wrt=wrt)
    p(torch.randn(2, 4, 4, dtype=torch.float64), torch.randn(2, 4, 4, dtype=torch.float64))
    torch._dynamo.reset()
    compiled = torch.compile(p, backend="eager", fullgraph=True, dynamic=True)
    for batch in BATCHES:
        x, w = torch.randn(batch, 4, 4, dtype=torch.float64), torch.randn(batch, 4, 4, dtype=torch.float64)
        ref, pull = torch.func.vjp(lambda *a: torch.func.functional_call(model, {"w": a[0]}, (a[1],)), model.w, x)
        got = compiled(x, w)[1]
        _close(got, pull(w)[0 if wrt == "params" else 1].reshape(got.shape))


def test_many_products_compiled_in_one_process():
    # torch.compile(product) compiles the product's __call__; dynamo keeps at most 8 versions per code object, so
    # a shared __call__ made the 9th compiled product of a process fail under fullgraph=True.
    torch._dynamo.reset()
    model = _model()
    x = torch.randn(BATCHES[0], 4)
    for i in range(10):
        p = fxjac.vjp(model, wrt="params" if i % 2 else "input", example_inputs=(x,))
        w = torch.randn(BATCHES[0], 3)
        _close(torch.compile(p, backend="eager", fullgraph=True, dynamic=True)(x, w)[1], p(x, w)[1])


class _WideConv(nn.Module):
    """A second convolution with 6 input channels: per-sample weight gradients by ATen's kernel with the batch
    among the groups."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2, self.fc = nn.Conv2d(3, 6, 3, padding=1), nn.Conv2d(6, 6, 3), nn.Linear(24, 4)

    def forward(self, x):
        return self.fc(torch.relu(self.c2(F.max_pool2d(torch.relu(self.c1(x)), 2))).flatten(1))


@pytest.mark.parametrize("name, options, backend", [
    ("vjp", dict(wrt="params", reduce="none"), "inductor"),
    ("ggn", dict(loss="cross_entropy", out="diag", method="diag_backprop"), "aot_eager"),
])
def test_a_new_batch_size_does_not_recompile(name, options, backend):
    """With dynamic=True a product compiles once for every batch size (below 16 here, where a convolution's
    shape function guards): ATen's convolution backward with the batch among its groups is an opaque op
    (inductor's lowering made the groups, so the batch, a constant), and the squared interpolation matrices
    go one axis at a time (an einsum chose its order by the sizes, the batch's among them).
    """
    torch.manual_seed(0)
    if name == "vjp":
        model, shape, ops = _WideConv().eval(), (3, 8, 8), lambda b: (torch.randn(b, 4),)
    else:
        model = nn.Sequential(nn.Conv2d(2, 3, 1), nn.Upsample(scale_factor=2, mode="bilinear")).eval()
        shape, ops = (2, 4, 4), lambda b: ()
    p = getattr(fxjac, name)(model, example_inputs=(torch.randn(5, *shape),), **options)
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(p, backend=backend, fullgraph=True, dynamic=True)
    for batch in (11, 12, 13, 14):
        x = torch.randn(batch, *shape)
        args = (x, *ops(batch))
        _close(compiled(*args)[1], p(*args)[1])
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])


def test_an_empty_batch_under_compile():
    """Note [an empty batch] under torch.compile (both made-up batches in the graph for B = 0) and through
    fxjac.compile (eagerly): empty per-sample results, zero sums; the batches around it unchanged."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 5)).eval()
    n_params = sum(q.numel() for q in model.parameters())
    x, w = torch.randn(3, 3, 4, 4), torch.randn(3, 5)
    for reduce, shape in (("none", (0, n_params)), ("sum", (n_params,))):
        p = fxjac.vjp(model, wrt="params", reduce=reduce, example_inputs=(x,))
        torch._dynamo.reset()
        for run in (torch.compile(p, backend="aot_eager", fullgraph=True, dynamic=True),
                    fxjac.compile(model, "vjp", wrt="params", reduce=reduce, backend="aot_eager")):
            _close(run(x, w)[1], p(x, w)[1])
            y, r = run(x[:0], w[:0])
            assert y.shape == (0, 5) and r.shape == shape and not r.any()
            _close(run(x[:2], w[:2])[1], p(x[:2], w[:2])[1])



def test_fxjac_compile_leaves_library_globals_unguarded(monkeypatch):
    """fxjac.compile drops dynamo's guards on fxjac's, torch's and the builtins' globals (Note [guards of a
    compiled product] in fxjac/util.py) and keeps the others: on the inputs, the parameters, the modules."""
    import fxjac.util

    kept, original = {}, fxjac.util.library_globals_unguarded

    def record(entries):
        keep = original(entries)
        kept.update({e.name: k for e, k in zip(entries, keep)})
        return keep

    monkeypatch.setattr(fxjac.util, "library_globals_unguarded", record)
    model = _model()
    x, w = torch.randn(BATCHES[0], 4), torch.randn(BATCHES[0], 3)
    torch._dynamo.reset()
    compiled = fxjac.compile(model, "vjp", wrt="params", example_inputs=(x,), backend="eager")
    eager = fxjac.vjp(model, wrt="params", example_inputs=(x,))
    for batch in BATCHES:
        x, w = torch.randn(batch, 4), torch.randn(batch, 3)
        _close(compiled(x, w)[1], eager(x, w)[1])
    dropped = [n for n, k in kept.items() if not k]
    assert any(n.startswith("G['__import_fxjac") for n in dropped) and any(n.startswith("G['torch']") for n in dropped)
    assert all(k for n, k in kept.items() if not n.startswith("G[")), [n for n in dropped if not n.startswith("G[")]
