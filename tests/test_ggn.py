"""The GGN of each loss, diagonal back-propagation, and the memory bound of the exact diagonal."""

import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from reference import assert_close, check_diag_backprop, check_metric_products, loss_hessian, per_sample_jacobian

import fxjac
import fxjac.zoo as zoo


def dense_ggn(model, xs, loss, **kw):
    J = per_sample_jacobian(model, xs, "params")
    H = loss_hessian(model(*xs).detach(), loss, **kw)
    return torch.einsum("bop,boq,bqr->bpr", J, H, J)  # per sample [B, P, P]


CASES = [("mlp", "cross_entropy"), ("cnn", "cross_entropy"), ("resnet", "cross_entropy"),
         ("transformer_explicit", "cross_entropy"), ("unet", "mse"), ("small_mlp", "bce"),
         ("small_mlp", "gaussian"), ("two_input", "mse")]


@pytest.mark.parametrize("name,loss", CASES)
def test_ggn_against_dense(name, loss):
    model, _ = zoo.build(name)
    xs = zoo.example_inputs(name, 3)
    G = dense_ggn(model, xs, loss)
    _, d = fxjac.ggn(model, loss=loss)(*xs)
    assert_close(d, torch.diagonal(G.sum(0)), f"ggn[{name}, {loss}] diag")
    _, f = fxjac.ggn(model, loss=loss, out="full")(*xs)
    assert_close(f, G.sum(0), f"ggn[{name}, {loss}] full")
    _, dn = fxjac.ggn(model, loss=loss, reduce="none")(*xs)
    assert_close(dn, torch.diagonal(G, dim1=-2, dim2=-1), f"ggn[{name}, {loss}] diag per sample")


@pytest.mark.parametrize("name,loss", [("mlp", "cross_entropy"), ("cnn", "cross_entropy"), ("unet", "mse")])
def test_ggn_with_respect_to_the_input_is_each_samples(name, loss):
    # The pull-back of the loss Hessian to the input space (a data-space metric), one per sample.
    model, _ = zoo.build(name)
    xs = zoo.example_inputs(name, 2)
    J = per_sample_jacobian(model, xs)  # [B, O, I]
    G = torch.einsum("boi,boq,bqj->bij", J, loss_hessian(model(*xs).detach(), loss), J)
    assert_close(fxjac.ggn(model, loss=loss, wrt="input", out="full")(*xs)[1], G, f"input ggn[{name}] full")
    assert_close(fxjac.ggn(model, loss=loss, wrt="input")(*xs)[1], torch.diagonal(G, dim1=-2, dim2=-1),
                 f"input ggn[{name}] diag")


def test_ggn_gaussian_nll_and_sigma_and_spatial_cross_entropy():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 4), nn.Unflatten(1, (2, 2))).double()
    x = torch.randn(5, 3, dtype=torch.float64)
    G = dense_ggn(net, (x,), "gaussian_nll")
    _, d = fxjac.ggn(net, loss="gaussian_nll", out="full")(x)
    assert_close(d, G.sum(0), "gaussian_nll Fisher GGN")
    G2 = dense_ggn(net, (x,), "gaussian", sigma=0.5)
    _, d2 = fxjac.ggn(net, loss="gaussian", sigma=0.5)(x, target=torch.zeros(5, 2, 2))
    assert_close(d2, torch.diagonal(G2.sum(0)), "gaussian GGN with sigma")
    seg = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.Tanh(), nn.Conv2d(3, 3, 1)).double()
    xi = torch.randn(2, 2, 3, 3, dtype=torch.float64)
    G3 = dense_ggn(seg, (xi,), "cross_entropy")
    _, d3 = fxjac.ggn(seg, loss="cross_entropy")(xi)
    assert_close(d3, torch.diagonal(G3.sum(0)), "per-pixel cross-entropy GGN")


@pytest.mark.parametrize("sigma_shape", [(2, 1), (2, 2), ()])
def test_gaussian_sigma_tensor_shaped_like_a_sample(sigma_shape):
    """``sigma=`` as a tensor (one standard deviation per output entry, broadcast over a sample): the product's
    code holds its values, not the tensor (a tensor in generated code was a NameError at the first call).
    """
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 4), nn.Unflatten(1, (2, 2))).double()
    x = torch.randn(5, 3, dtype=torch.float64)
    sigma = 0.3 + torch.rand(sigma_shape, dtype=torch.float32)  # float32 on a float64 net: cast by the product
    G = dense_ggn(net, (x,), "gaussian", sigma=sigma.double()).sum(0)
    _, d = fxjac.ggn(net, loss="gaussian", sigma=sigma)(x)
    assert_close(d, torch.diagonal(G), "gaussian GGN diagonal, tensor sigma")
    _, f = fxjac.ggn(net, loss="gaussian", sigma=sigma, out="full", chunk_size=1)(x)
    assert_close(f, G, "gaussian GGN, tensor sigma, one column per chunk")
    v = torch.randn(G.shape[0], dtype=torch.float64)
    _, gv = fxjac.ggn_vp(net, loss="gaussian", sigma=sigma)(x, v)
    assert_close(gv, G @ v, "gaussian GGN-vector product, tensor sigma")


@pytest.mark.parametrize("sigma, words", [(-1.0, "positive"), (torch.tensor([1.0, 0.0]), "positive"),
                                          (float("nan"), "positive"), (torch.ones(3), "broadcast"),
                                          ("wide", "sigma"), (torch.tensor([1.0, 2.0]), "fewer axes"),
                                          (2 + 3j, "positive float"), (torch.tensor([[1 + 5j, 2]]), "positive float")])
def test_gaussian_sigma_is_checked_when_built(sigma, words):
    net = nn.Sequential(nn.Linear(3, 4), nn.Unflatten(1, (2, 2)))
    for build in (lambda: fxjac.ggn(net, loss="gaussian", sigma=sigma, example_inputs=(torch.randn(2, 3),)),
                  lambda: fxjac.ggn_vp(net, loss="gaussian", sigma=sigma, example_inputs=(torch.randn(2, 3),))):
        with pytest.raises(fxjac.OptionError, match=words):
            build()


@pytest.mark.parametrize("class_dim", [-1, 2])
def test_cross_entropy_over_the_last_axis(class_dim):
    # Logits [B, T, C] (a language model): the loss Hessian is softmax's at every position, classes on the last
    # axis, named from the end or the front. A negative axis once moved the columns' axis instead.
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 5)).double()
    x = torch.randn(2, 3, 4, dtype=torch.float64)
    G = dense_ggn(net, (x,), "cross_entropy", class_dim=class_dim).sum(0)
    for out, ref in (("diag", torch.diagonal(G)), ("full", G)):
        _, got = fxjac.ggn(net, loss="cross_entropy", out=out, class_dim=class_dim)(x)
        assert_close(got, ref, f"GGN {out}, class_dim={class_dim}")
    v = torch.randn(G.shape[0], dtype=torch.float64)
    _, gv = fxjac.ggn_vp(net, loss="cross_entropy", class_dim=class_dim)(x, v)
    assert_close(gv, G @ v, f"GGN-vector product, class_dim={class_dim}")


@pytest.mark.parametrize("shape,class_dim", [((4, 7), 1), ((3, 5, 2, 3), 1), ((2, 3, 6), -1), ((3, 2), 1),
                                             ((3, 1), 1)])
def test_cross_entropy_factor_has_one_column_less_per_position(shape, class_dim):
    # The softmax Hessian diag(p) - p pᵀ has rank C - 1: its factor has C - 1 columns per position (one class: its
    # zero column), and F Fᵀ is the Hessian torch.func computes, also where one class takes nearly all mass.
    from fxjac.losses import cross_entropy_columns, factor_width
    torch.manual_seed(0)
    for scale in (1.0, 30.0):
        y = torch.randn(shape, dtype=torch.float64) * scale
        cols = cross_entropy_columns(y, class_dim)
        c = y.shape[class_dim]
        per_position = max(c - 1, 1)
        assert cols.shape == (y[0].numel() // c * per_position,) + shape
        assert cols.shape[0] == factor_width("cross_entropy", y, class_dim)
        F = cols.reshape(cols.shape[0], shape[0], -1).permute(1, 2, 0)
        H = loss_hessian(y, "cross_entropy", class_dim=class_dim)
        assert_close(F @ F.transpose(1, 2), H, f"factor of the softmax Hessian {shape}, scale {scale}")


def _confident_hessian(y, loss):
    """The loss Hessian per sample ``[B, C, C]`` in forms that never subtract from a probability near 1."""
    if loss == "bce":
        return torch.diag_embed(torch.sigmoid(y) * torch.sigmoid(-y))
    p = torch.softmax(y, 1)
    eye = torch.eye(p.shape[1], dtype=p.dtype)
    rest = (p.unsqueeze(1) * (1 - eye)).sum(2)  # 1 - p_i as the sum of the other classes
    return torch.diag_embed(p * rest) - p.unsqueeze(2) * p.unsqueeze(1) * (1 - eye)


class _Shifted(nn.Module):
    """A Linear whose logits are shifted by a fixed buffer (a confident classifier)."""

    def __init__(self, shift, dtype):
        super().__init__()
        self.net = nn.Linear(3, shift.shape[1]).to(dtype)
        self.register_buffer("shift", shift.to(dtype))

    def forward(self, x):
        return self.net(x) + self.shift


@pytest.mark.parametrize("dtype, gap", [(torch.float32, 20.0), (torch.float32, 40.0), (torch.float64, 60.0)])
@pytest.mark.parametrize("loss", ["cross_entropy", "bce"])
def test_confident_predictions_keep_their_curvature(loss, dtype, gap):
    # Note [confident predictions]: winning classes by a logit gap of 20-60, first, middle and last. Their Hessian
    # entries are about e^-gap, which 1 - p loses (float32: 18 % off at a gap of 30 with the Householder pivot on
    # the last class; bce's s (1 - s) was 0 beyond 17). On the bias the GGN is the loss Hessian itself.
    torch.manual_seed(0)
    if loss == "cross_entropy":
        shift = gap * torch.eye(5)[[0, 2, 4]]  # sample b's winner: class 2b
    else:
        shift = gap * torch.tensor([[1.0, -1.0, 1.0, -1.0, 0.5]]).expand(3, 5)
    model = _Shifted(shift, dtype)
    x = torch.randn(3, 3, dtype=dtype)
    H = _confident_hessian(model(x).double(), loss)  # [B, 5, 5]
    wrt = ["net.bias"]
    _, got = fxjac.ggn(model, loss=loss, out="full", wrt=wrt)(x)
    assert_close(got, H.sum(0), f"{loss} GGN (bias), gap {gap}", dtype)
    diag = torch.diagonal(H, dim1=1, dim2=2)
    _, got = fxjac.ggn(model, loss=loss, out="diag", wrt=wrt, reduce="none")(x)
    assert_close(got, diag, f"{loss} GGN diagonal per sample, gap {gap}", dtype)
    _, got = fxjac.ggn(model, loss=loss, out="diag", wrt=wrt, method="diag_backprop", reduce="none")(x)
    assert_close(got, diag, f"{loss} diagonal backprop (one op: exact), gap {gap}", dtype)
    for k in range(5):  # every column of the summed Hessian, the winners' small entries included
        v = torch.eye(5, dtype=dtype)[k]
        _, got = fxjac.ggn_vp(model, loss=loss, wrt=wrt)(x, v)
        assert_close(got, H.sum(0)[:, k], f"{loss} GGN-vector product, column {k}, gap {gap}", dtype)
    # per sample, the relative error of each entry (assert_close scales by the largest one)
    _, got = fxjac.ggn(model, loss=loss, out="diag", wrt=wrt, reduce="none")(x)
    assert ((got.double() - diag).abs() <= 1e-4 * diag).all(), (got, diag)


def test_cross_entropy_ggn_is_differentiable_where_a_probability_underflows():
    # √p of an underflowed probability had an infinite derivative: NaN gradients with differentiable=True.
    torch.manual_seed(0)
    net = nn.Linear(3, 4)
    x = 200 * torch.randn(2, 3)  # logit gaps in the hundreds: float32 probabilities of exactly 0
    assert (torch.softmax(net(x), 1) == 0).any()
    _, G = fxjac.ggn(net, loss="cross_entropy", out="full", wrt=["bias"], differentiable=True)(x)
    got = torch.autograd.grad(G.sum(), [net.weight, net.bias])
    w, b = (t.detach().double().requires_grad_() for t in (net.weight, net.bias))
    ref = torch.autograd.grad(_confident_hessian(x.double() @ w.t() + b, "cross_entropy").sum(), [w, b])
    for g, r in zip(got, ref):
        assert torch.isfinite(g).all()
        assert_close(g, r, "gradient of the bias's GGN", torch.float32)


def test_class_dim_and_sigma_belong_to_their_losses():
    net = nn.Linear(3, 3)
    for loss in ("mse", "bce", "gaussian", "gaussian_nll"):
        with pytest.raises(fxjac.OptionError, match="class_dim= is the cross-entropy's"):
            fxjac.ggn(net, loss=loss, class_dim=-1)
    with pytest.raises(fxjac.OptionError, match=r"sigma of shape \(1, 3\) has more axes than one output sample"):
        fxjac.ggn(net, loss="gaussian", sigma=torch.ones(1, 3), example_inputs=(torch.randn(2, 3),))


@pytest.mark.parametrize("class_dim", [0, 3, -4, 1.0])
def test_class_dim_on_the_batch_or_outside_the_output_is_refused(class_dim):
    net = nn.Linear(4, 5)
    with pytest.raises(fxjac.OptionError, match="class_dim"):
        fxjac.ggn(net, loss="cross_entropy", class_dim=class_dim)(torch.randn(2, 3, 4))
    with pytest.raises(fxjac.OptionError, match="class_dim"):
        fxjac.ggn_vp(net, loss="cross_entropy", class_dim=class_dim)(torch.randn(2, 3, 4), torch.randn(25))


def test_ggn_matches_backpack_diag_ggn_exact():
    backpack = pytest.importorskip("backpack")
    from backpack.extensions import DiagGGNExact

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 4)).double()
    x = torch.randn(8, 6, dtype=torch.float64)
    t = torch.randint(0, 4, (8,))
    _, d = fxjac.ggn(model, loss="cross_entropy")(x, target=t)
    bp_model = backpack.extend(nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 4)).double())
    bp_model.load_state_dict(model.state_dict())
    lossf = backpack.extend(nn.CrossEntropyLoss(reduction="sum"))
    with backpack.backpack(DiagGGNExact()):
        lossf(bp_model(x), t).backward()
    ref = torch.cat([p.diag_ggn_exact.reshape(-1) for p in bp_model.parameters()])
    assert_close(d, ref, "ggn vs BackPACK DiagGGNExact")


ONE_OP = [
    nn.Linear(4, 3), nn.Tanh(), nn.Sigmoid(), nn.ReLU(), nn.GELU(), nn.Softplus(), nn.SiLU(),
]


@pytest.mark.parametrize("op", ONE_OP, ids=lambda m: type(m).__name__)
def test_diag_backprop_is_exact_on_one_op(op):
    x = torch.randn(3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    check_diag_backprop(op.double(), (x,))


def layerwise_diag_backprop(layers, x, d):
    """nnj's diagonal back-propagation written layer by layer with dense per-layer Jacobians."""
    acts = [x]
    for layer in layers:
        acts.append(layer(acts[-1]))
    diag_params = []
    for layer, a in zip(reversed(layers), reversed(acts[:-1])):
        params = dict(layer.named_parameters())
        B = a.shape[0]
        if params:
            f = lambda prm, a=a, layer=layer: torch.func.functional_call(layer, prm, (a,))  # noqa: E731
            jp = torch.func.jacrev(f)(params)
            for n in reversed(list(params)):
                j = jp[n].reshape(B, -1, params[n].numel())
                diag_params.insert(0, torch.einsum("bo,bop->p", d, j * j))
        jx = torch.func.jacrev(layer)(a).reshape(B, -1, B, a[0].numel())
        jx = torch.stack([jx[b, :, b] for b in range(B)])
        d = torch.einsum("bo,boi->bi", d, jx * jx)
    return d, torch.cat(diag_params)


def test_diag_backprop_equals_layer_by_layer_reference():
    torch.manual_seed(0)
    layers = [nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 5), nn.Sigmoid(), nn.Linear(5, 3)]
    model = nn.Sequential(*layers).double()
    x = torch.randn(5, 4, dtype=torch.float64)
    d = torch.rand(5, 3, dtype=torch.float64)
    dx_ref, dp_ref = layerwise_diag_backprop(list(model), x, d)
    _, dp = fxjac.jtmjp(model, wrt="params", matrix="diag", out="diag", method="diag_backprop")(x, d)
    _, dx = fxjac.jtmjp(model, wrt="input", matrix="diag", out="diag", method="diag_backprop")(x, d)
    assert_close(dp, dp_ref, "diag backprop, parameters")
    assert_close(dx, dx_ref, "diag backprop, input")
    # ggn(method="diag_backprop") starts from the diagonal of the loss Hessian.
    p = torch.softmax(model(x), 1)
    _, dg = fxjac.ggn(model, loss="cross_entropy", method="diag_backprop")(x)
    assert_close(dg, layerwise_diag_backprop(list(model), x, p * (1 - p))[1], "ggn diag backprop")


def test_diag_backprop_options_are_checked():
    model = nn.Linear(3, 2)
    with pytest.raises(fxjac.OptionError, match="diag"):
        fxjac.jtmjp(model, matrix="full", out="diag", method="diag_backprop")
    with pytest.raises(fxjac.OptionError, match="diag"):
        fxjac.jtmjp(model, matrix="diag", out="full", method="diag_backprop")


def test_exact_diag_ggn_never_allocates_batch_by_columns_by_params():
    """P >= 1e6, batch 32: no tensor of B*K*P elements (not even one layer's B*K*P_layer for the big Linear)."""
    model, _ = zoo.build("large_mlp", preset="bench", dtype=torch.float32)
    P = sum(p.numel() for p in model.parameters())
    assert P >= 1_000_000
    (x,) = zoo.example_inputs("large_mlp", 32, preset="bench", dtype=torch.float32)
    K = model(x).shape[1]
    p = fxjac.ggn(model, loss="cross_entropy", example_inputs=(x,))
    biggest = max(q.numel() for q in model.parameters())
    with torch.profiler.profile(profile_memory=True, record_shapes=True) as prof:
        _, d = p(x)
    sizes = [e.cpu_memory_usage for e in prof.events() if e.cpu_memory_usage > 0]
    assert d.shape == (P,)
    limit = 32 * K * biggest * 4  # bytes of one [B, K, P_largest] float32 tensor
    assert max(sizes) < limit / 4, f"largest allocation {max(sizes)} bytes; B*K*P_layer would be {limit}"


def test_chunked_columns_give_the_same_result():
    model, _ = zoo.build("cnn")
    xs = zoo.example_inputs("cnn", 3)
    _, ref = fxjac.ggn(model, loss="cross_entropy", out="block")(*xs)
    p = fxjac.ggn(model, loss="cross_entropy", out="block", chunk_size=1, example_inputs=xs)
    assert "column_loop_0(" in p.code and "take(" not in p.code  # one copy of the chunk, called in a loop
    _, got = p(*xs)
    for a, b in zip(got, ref):
        assert_close(a, b, "chunked ggn blocks")
    _, d_ref = fxjac.jtmjp(model, wrt="params", matrix="diag", out="diag")(*xs, torch.ones(3, 3, dtype=torch.float64))
    ones = torch.ones(3, 3, dtype=torch.float64)
    _, d = fxjac.jtmjp(model, wrt="params", matrix="diag", out="diag", chunk_size=1)(*xs, ones)
    assert_close(d, d_ref, "chunked jtmjp diag")
    for mode in ("forward", "reverse"):
        _, J = fxjac.jacobian(model, mode=mode, chunk_size=5)(*xs)
        assert_close(J, per_sample_jacobian(model, xs, "input"), f"chunked jacobian ({mode})")
    _, t = fxjac.jvp(model, chunk_size=4)(*xs, xs[0])  # one column: nothing to chunk
    assert_close(t, fxjac.jvp(model)(*xs, xs[0])[1], "jvp with chunk_size")
    with pytest.raises(fxjac.OptionError, match="rows cannot go through in chunks"):
        fxjac.jmjtp(model, wrt="params", matrix="diag", chunk_size=4)
    # mode="auto" w.r.t. the input would pull J's rows (fewer than the inputs); chunk_size asks for M's columns in
    # chunks, the forward mode (it raised at the first call, blaming mode='reverse')
    J = per_sample_jacobian(model, xs, "input")
    assert J.shape[1] < J.shape[2]
    d = torch.rand(3, J.shape[2], dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    _, got = fxjac.jmjtp(model, matrix="diag", chunk_size=J.shape[2] // 2)(*xs, d)
    assert_close(got, torch.einsum("boi,bi,bqi->boq", J, d, J), "jmjtp[input, diag] with chunk_size, mode='auto'")


@pytest.mark.parametrize("name", ["resnet", "transformer_mha"])
def test_operand_columns_in_chunks(name):
    """``chunk_size`` where K is the operand's, known at run time (jmp, mjp, jtmjp/jmjtp with a factor ``S``):
    one outlined copy of the pass in a loop of ceil(K / chunk_size) chunks, the last padded, for any K the
    operand brings (fewer than a chunk, none), against the dense float64 Jacobian."""
    model, _ = zoo.build(name, preset="small")
    model = model.double().eval()
    xs = zoo.example_inputs(name, 2, preset="small", dtype=torch.float64)
    J_in, J_p = per_sample_jacobian(model, xs, "input"), per_sample_jacobian(model, xs, "params")
    B, O, I = J_in.shape
    P = J_p.shape[2]
    g = torch.Generator().manual_seed(11)
    products = {
        "jmp[input]": (fxjac.jmp(model, chunk_size=3, example_inputs=xs), lambda k: torch.randn(B, I, k, generator=g,
                       dtype=torch.float64), lambda M: torch.einsum("boi,bik->bok", J_in, M)),
        "jmp[params]": (fxjac.jmp(model, wrt="params", chunk_size=3, example_inputs=xs),
                        lambda k: torch.randn(P, k, generator=g, dtype=torch.float64),
                        lambda M: torch.einsum("bop,pk->bok", J_p, M)),
        "mjp[input]": (fxjac.mjp(model, chunk_size=3, example_inputs=xs),
                       lambda k: torch.randn(B, k, O, generator=g, dtype=torch.float64),
                       lambda M: torch.einsum("bko,boi->bki", M, J_in)),
        "mjp[params]": (fxjac.mjp(model, wrt="params", chunk_size=3, example_inputs=xs),
                        lambda k: torch.randn(B, k, O, generator=g, dtype=torch.float64),
                        lambda M: torch.einsum("bko,bop->kp", M, J_p)),
        "mjp[params, none]": (fxjac.mjp(model, wrt="params", reduce="none", chunk_size=3, example_inputs=xs),
                              lambda k: torch.randn(B, k, O, generator=g, dtype=torch.float64),
                              lambda M: torch.einsum("bko,bop->bkp", M, J_p)),
        "jtmjp[params, sqrt]": (fxjac.jtmjp(model, wrt="params", matrix="sqrt", out="diag", chunk_size=3,
                                            example_inputs=xs),
                                lambda k: torch.randn(B, O, k, generator=g, dtype=torch.float64),
                                lambda S: torch.einsum("bop,bok,bqk,bqp->p", J_p, S, S, J_p)),
        "jtmjp[input, sqrt]": (fxjac.jtmjp(model, matrix="sqrt", chunk_size=3, example_inputs=xs),
                               lambda k: torch.randn(B, O, k, generator=g, dtype=torch.float64),
                               lambda S: torch.einsum("boi,bok,bqk,bqj->bij", J_in, S, S, J_in)),
        "jmjtp[input, sqrt]": (fxjac.jmjtp(model, matrix="sqrt", chunk_size=3, example_inputs=xs),
                               lambda k: torch.randn(B, I, k, generator=g, dtype=torch.float64),
                               lambda S: torch.einsum("boi,bik,bjk,bqj->boq", J_in, S, S, J_in)),
        "jmjtp[input, diag]": (fxjac.jmjtp(model, matrix="diag", mode="forward", chunk_size=3, example_inputs=xs),
                               lambda k: torch.rand(B, I, generator=g, dtype=torch.float64),
                               lambda d: torch.einsum("boi,bi,bqi->boq", J_in, d, J_in)),
    }
    for what, (p, operand, ref) in products.items():
        assert "column_loop_0(" in p.code, what
        for k in (7, 2, 0):
            M = operand(k)
            assert_close(p(*xs, M)[1], ref(M), f"{name} {what} with K = {k} in chunks of 3")


@pytest.mark.parametrize("name, loss", [("resnet", "mse"), ("unet", "mse"), ("transformer_mha", "mse")])
def test_column_loops_match_the_dense_reference(name, loss):
    """Chunks of columns go through one outlined copy of the backward pass, called in a loop (Note [column loops]):
    on branching nets (additive skips and batch norm, concatenations and resampling, attention), with a last chunk
    padded by zero columns, every exact GGN form and an output-space metric with eigen-weighted columns match the
    dense float64 reference.
    """
    model, _ = zoo.build(name, preset="small")
    model = model.double().eval()
    xs = zoo.example_inputs(name, 2, preset="small", dtype=torch.float64)
    y = model(*xs)
    J = per_sample_jacobian(model, xs, "params")  # [B, O, P]
    H = loss_hessian(y, loss)
    G = torch.einsum("bop,boq,bqr->bpr", J, H, J)
    k = y[0].numel() - (loss == "cross_entropy")  # the factor's columns (C - 1 for cross-entropy)
    width = next(w for w in range(2, k) if k % w)  # never divides k: the last chunk is padded
    p = fxjac.ggn(model, loss=loss, out="diag", chunk_size=width, example_inputs=xs)
    assert "column_loop_0(" in p.code
    assert_close(p(*xs)[1], torch.diagonal(G.sum(0)), f"{name} looped ggn diag")
    assert_close(fxjac.ggn(model, loss=loss, out="diag", reduce="none", chunk_size=width)(*xs)[1],
                 torch.diagonal(G, dim1=1, dim2=2), f"{name} looped per-sample ggn diag")
    if name != "unet":  # [P, P] of the U-Net's 14k parameters: the diagonal forms suffice there
        blocks = fxjac.ggn(model, loss=loss, out="block", chunk_size=width)(*xs)[1]
        assert_close(torch.block_diag(*blocks), _block_diagonal(G.sum(0), [b.shape[0] for b in blocks]),
                     f"{name} looped ggn blocks")
    gen = torch.Generator().manual_seed(3)
    a = torch.randn(2, y[0].numel(), y[0].numel(), generator=gen, dtype=torch.float64)
    M = a + a.transpose(1, 2)  # symmetric, indefinite: eigen-weighted columns
    got = fxjac.jtmjp(model, wrt="params", matrix="full", out="diag", chunk_size=width)(*xs, M)[1]
    assert_close(got, torch.einsum("bop,boq,bqp->p", J, M, J), f"{name} looped jtmjp full M")


@pytest.mark.parametrize("name", ["resnet", "unet", "transformer_mha"])
@pytest.mark.parametrize("wrt", ["input", "params"])
@pytest.mark.parametrize("mode", ["forward", "reverse"])
def test_jacobian_column_loops(name, wrt, mode):
    """The Jacobian's columns (forward) or rows (reverse) in a loop, concatenated, the padded chunk cut off."""
    model, _ = zoo.build(name, preset="small")
    model = model.double().eval()
    xs = zoo.example_inputs(name, 2, preset="small", dtype=torch.float64)
    ref = per_sample_jacobian(model, xs, wrt)
    k = ref.shape[2] if mode == "forward" else ref.shape[1]
    width = next(w for w in range(2, k) if k % w)
    p = fxjac.jacobian(model, wrt=wrt, mode=mode, chunk_size=width, example_inputs=xs)
    assert "column_loop_0(" in p.code
    assert_close(p(*xs)[1], ref, f"{name} jacobian[{wrt}, {mode}] in chunks of {width}")


def test_chunks_unroll_where_the_loop_cannot_be_outlined(monkeypatch):
    """Where outlining is refused, each chunk gets its own copy of the backward pass in the graph, as before."""
    import fxjac.direction as direction
    from passes.loop import outline

    monkeypatch.setattr(direction, "chunk_body", lambda *args: None)
    model, _ = zoo.build("resnet", preset="small")
    model = model.double().eval()
    xs = zoo.example_inputs("resnet", 2, preset="small", dtype=torch.float64)
    p = fxjac.ggn(model, loss="mse", out="diag", chunk_size=2, example_inputs=xs)
    assert p.code.count("take(") >= 2 and "add_all(" in p.code and "column_loop" not in p.code
    J, H = per_sample_jacobian(model, xs, "params"), loss_hessian(model(*xs), "mse")
    assert_close(p(*xs)[1], torch.einsum("bop,boq,bqp->p", J, H, J), "unrolled chunks")

    @torch.fx.node.has_side_effect
    def write(buf, t):
        return buf.add_(t)

    g = torch.fx.Graph()  # a chunk that would write into a value computed before it: refused, graph unchanged
    x = g.placeholder("x")
    buf = g.call_function(torch.zeros_like, (x,))
    root = g.call_function(torch.neg, (x,))
    out = g.call_function(write, (buf, root))
    before = list(g.nodes)
    assert outline(g, buf, [root, None], out) is None
    assert list(g.nodes) == before


def _block_diagonal(m, sizes):
    out, at = torch.zeros_like(m), 0
    for n in sizes:
        out[at:at + n, at:at + n] = m[at:at + n, at:at + n]
        at += n
    return out


def layerwise_diag_forward(layers, x, d_in=None, d_params=None):
    """nnj's forward diagonal propagation, layer by layer, from dense per-layer Jacobians."""
    B = x.shape[0]
    d = torch.zeros(B, x[0].numel(), dtype=x.dtype) if d_in is None else d_in
    off = 0
    for layer in layers:
        params = dict(layer.named_parameters())
        jx = torch.func.jacrev(layer)(x).reshape(B, -1, B, x[0].numel())
        jx = torch.stack([jx[b, :, b] for b in range(B)])
        out = torch.einsum("boi,bi->bo", jx * jx, d)
        if params and d_params is not None:
            f = lambda prm, x=x, layer=layer: torch.func.functional_call(layer, prm, (x,))  # noqa: E731
            jp = torch.func.jacrev(f)(params)
            for n, p in params.items():
                j = jp[n].reshape(B, -1, p.numel())
                out = out + torch.einsum("bop,p->bo", j * j, d_params[off:off + p.numel()])
                off += p.numel()
        x, d = layer(x), out
    return d


def test_forward_diagonal_propagation_equals_layer_by_layer_reference():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 5), nn.Sigmoid(), nn.Linear(5, 3)).double()
    x = torch.randn(5, 4, dtype=torch.float64)
    d_in = torch.rand(5, 4, dtype=torch.float64)
    P = sum(p.numel() for p in model.parameters())
    sigma = torch.rand(P, dtype=torch.float64)
    _, r_in = fxjac.jmjtp(model, matrix="diag", out="diag", method="diag_backprop")(x, d_in)
    assert_close(r_in, layerwise_diag_forward(list(model), x, d_in=d_in), "forward diag, input")
    _, r_p = fxjac.jmjtp(model, wrt="params", matrix="diag", out="diag", method="diag_backprop")(x, sigma)
    assert_close(r_p, layerwise_diag_forward(list(model), x, d_params=sigma), "forward diag, parameters")
    # one Linear: no cross terms, so the approximation is the exact diagonal of J Σ Jᵀ
    lin = nn.Linear(4, 3).double()
    _, exact = fxjac.jmjtp(lin, wrt="params", matrix="diag", out="diag")(x, sigma[:15])
    _, approx = fxjac.jmjtp(lin, wrt="params", matrix="diag", out="diag", method="diag_backprop")(x, sigma[:15])
    assert_close(approx, exact, "forward diag on one Linear")


def test_forward_diagonal_through_the_fallback_is_exact_per_op():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(2, 3, 3, padding=1), nn.ELU(), nn.AvgPool1d(2)).double()  # avg pool: fallback
    x = torch.randn(3, 2, 6, dtype=torch.float64)
    d_in = torch.rand(3, 12, dtype=torch.float64)
    _, r = fxjac.jmjtp(model, matrix="diag", out="diag", method="diag_backprop")(x, d_in)
    assert_close(r, layerwise_diag_forward(list(model), x, d_in=d_in), "forward diag with fallback ops")


class _Tokens(nn.Module):
    """A Linear on ``[B, T, d]`` (its weight meets every position: generic rows) before one on ``[B, in]``."""

    def __init__(self):
        super().__init__()
        self.embed, self.head = nn.Linear(3, 4), nn.Linear(2 * 4, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.embed(x.reshape(-1, 2, 3))).flatten(1))


class _Tied(nn.Module):
    """One Linear read twice (its rows are summed: generic), another read once, and an unused parameter."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 3, bias=False)
        self.unused = nn.Parameter(torch.ones(2))

    def forward(self, x):
        return self.b(torch.tanh(self.a(torch.tanh(self.a(x)))))


class _Summed(nn.Module):
    """Two Linears summed: their output cotangents are one node, their inputs differ."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 3), nn.Linear(4, 3)

    def forward(self, x):
        return self.a(x) + self.b(torch.tanh(x))


def _kron_models():
    torch.manual_seed(0)
    return {
        "mlp": (nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3)), (5, 4)),
        "mlp_no_bias": (nn.Sequential(nn.Linear(4, 6, bias=False), nn.Tanh(), nn.Linear(6, 3, bias=False)),
                        (5, 4)),
        "layernorm": (nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6), nn.Tanh(), nn.Linear(6, 3)), (5, 4)),
        "conv": (nn.Sequential(nn.Conv1d(2, 3, 3), nn.Tanh(), nn.Flatten(), nn.Linear(3 * 2, 4), nn.Tanh(),
                               nn.Linear(4, 3)), (5, 2, 4)),
        "tokens": (_Tokens(), (5, 6)),
        "tied": (_Tied(), (5, 4)),
        "summed": (_Summed(), (5, 4)),
    }


@pytest.mark.parametrize("name", ["mlp", "mlp_no_bias", "layernorm", "conv", "tokens", "tied", "summed"])
def test_full_ggn_of_linear_layers_in_closed_form(name, one_thread):
    """Note [Kronecker GGN]: Linear parameters on ``[B, in]`` contract their factors (blocks between them and
    with every other parameter); the full, block and chunked GGN match the dense float64 reference.
    """
    model, shape = _kron_models()[name]
    model = model.double()
    x = torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    G = dense_ggn(model, (x,), "cross_entropy")
    p = fxjac.ggn(model, loss="cross_entropy", out="full", example_inputs=(x,))
    assert "kron_gram" in p.code
    _, f = p(x)
    assert_close(f, G.sum(0), f"kron ggn[{name}] full")
    _, blocks = fxjac.ggn(model, loss="cross_entropy", out="block")(x)
    off = 0
    for blk in blocks:
        n = blk.shape[0]
        assert_close(blk, G.sum(0)[off:off + n, off:off + n], f"kron ggn[{name}] block@{off}")
        off += n
    assert off == G.shape[-1]
    _, fc = fxjac.ggn(model, loss="cross_entropy", out="full", chunk_size=2)(x)
    assert_close(fc, G.sum(0), f"kron ggn[{name}] chunked")
    _, fn = fxjac.ggn(model, loss="cross_entropy", out="full", reduce="none")(x)
    assert_close(fn, G, f"ggn[{name}] full per sample")


def test_full_ggn_of_a_linear_on_positions_stays_generic(one_thread):
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    x = torch.randn(5, 2, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    p = fxjac.ggn(model, loss="mse", out="full", example_inputs=(x,))
    assert "kron_gram" not in p.code
    _, f = p(x)
    assert_close(f, dense_ggn(model, (x,), "mse").sum(0), "ggn of Linears on [B, T, d]")


def test_full_ggn_falls_back_to_rows_where_the_kronecker_factors_are_larger():
    """A narrow head on a wide input: x ⊗ x per sample would outgrow its block and the rows; the pair of heads
    takes the rows, the others the closed form, and all are exact.
    """
    assert not fxjac.metric.kron_pays(2, 6, 2, 2, 10, 10)
    assert fxjac.metric.kron_pays(2, 6, 10, 10, 3, 3)
    model = nn.Sequential(nn.Linear(3, 10), nn.Tanh(), nn.Linear(10, 2)).double()
    x = torch.randn(6, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    for loss in ("mse", "cross_entropy", "gaussian"):
        _, f = fxjac.ggn(model, loss=loss, out="full")(x)
        assert_close(f, dense_ggn(model, (x,), loss).sum(0), f"ggn[{loss}] with a narrow head")


@pytest.mark.parametrize("name", ["mlp", "layernorm"])
def test_weighted_jtmjp_of_linear_layers_in_closed_form(name, one_thread):
    """Diagonal, square-root and full (indefinite) output metrics through the closed form, full and block."""
    model, shape = _kron_models()[name]
    x = torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    check_metric_products(model.double(), (x,), wrts=("params",), matrices=("identity", "diag", "sqrt", "full"))


@pytest.mark.parametrize("name", ["conv", "narrow_head"])
def test_full_ggn_in_closed_form_compiles_fullgraph(name):
    """Under torch.compile the Kronecker blocks are one custom op, which runs the eager writes into the result."""
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    model, shape = _kron_models()["conv"] if name == "conv" else \
        (nn.Sequential(nn.Linear(3, 10), nn.Tanh(), nn.Linear(10, 2)), (6, 3))
    g = torch.Generator().manual_seed(5)
    p = fxjac.ggn(model, loss="cross_entropy", out="full", example_inputs=(torch.randn(*shape, generator=g),))
    assert "kron_gram" in p.code
    torch._dynamo.reset()
    counters.clear()
    seen = set()

    def backend(gm, example_inputs):  # aot_eager, noting the custom ops in the captured graph
        seen.update(str(n.target) for n in gm.graph.nodes if str(n.target).startswith("fxjac."))
        return torch._dynamo.lookup_backend("aot_eager")(gm, example_inputs)

    compiled = torch.compile(p, backend=backend, fullgraph=True, dynamic=True)
    for batch in (5, 7):
        x = torch.randn(batch, *shape[1:], generator=g)
        got, ref = compiled(x)[1], p(x)[1]
        assert (got - ref).abs().max() <= 1e-5 * ref.abs().max()
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert any(t.startswith("fxjac.kron_gram") for t in seen), seen  # an eager kernel (custom op) when compiled


def test_closed_form_linear_weights_do_not_force_chunks():
    """The exact diagonal never forms per-sample stacks of a Linear weight on ``[B, in]`` (closed form), so such
    weights do not shrink the column chunks: one chunk here (P·B·4 bytes per column would otherwise be 1.6 GiB),
    while a weight used at several positions still counts and the result stays exact.
    """
    torch.manual_seed(0)
    wide = nn.Sequential(nn.Linear(1600, 2000), nn.Tanh(), nn.Linear(2000, 10))
    x = torch.randn(128, 1600)
    p = fxjac.ggn(wide, loss="cross_entropy", out="diag", example_inputs=(x,))
    p.ensure_built()
    assert "take" not in p.code
    small = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 4)).double()
    xs = torch.randn(7, 3, 6, dtype=torch.float64)  # positions: per-sample stacks, chunked by chunk_size
    got = fxjac.ggn(small, loss="mse", out="diag", chunk_size=2)(xs)[1]
    ref = fxjac.ggn(small, loss="mse", out="diag")(xs)[1]
    assert torch.allclose(got, ref, rtol=1e-12, atol=1e-14)


class _SeqFirst(nn.Module):
    """Positions first, the batch second: ``[T, B, d]`` (the shared-weight kernels must decline)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(3, 4), nn.Linear(4, 2)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x.transpose(0, 1)))).sum(0)


@pytest.mark.parametrize("layout", ["batch_first", "seq_first", "one_sample_per_piece"])
def test_weights_shared_across_positions_are_contracted_sample_major(layout, one_thread, monkeypatch):
    """A Linear on ``[B, T, d]``: the exact GGN diagonal and ``J diag(σ) Jᵀ`` contract its per-sample
    cotangents as soon as they are formed (``linear_weight_shared_*``), a few samples at a time; every metric
    product stays exact, also where the batch is not the first axis and the generic path is taken.
    """
    if layout == "one_sample_per_piece":
        monkeypatch.setattr(fxjac.rules.linear, "SHARED_CHUNK_BYTES", 1)
    g = torch.Generator().manual_seed(6)
    if layout != "seq_first":
        model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2), nn.Flatten()).double()
    else:
        model = _SeqFirst().double()
    x = torch.randn(5, 3, 3, dtype=torch.float64, generator=g)
    shared = layout != "seq_first"
    assert ("linear_weight_shared_sandwich" in fxjac.jmjtp(model, wrt="params", matrix="diag",
                                                          example_inputs=(x,)).code) == shared
    p = fxjac.ggn(model, loss="cross_entropy", out="diag", example_inputs=(x,))
    assert ("linear_weight_shared_gram_diag_into" in p.code) == shared
    dense = dense_ggn(model, (x,), "cross_entropy")
    assert_close(p(x)[1], torch.diagonal(dense.sum(0)), f"ggn diag [{layout}]")
    _, per = fxjac.ggn(model, loss="cross_entropy", out="diag", reduce="none")(x)
    assert_close(per, torch.diagonal(dense, dim1=-2, dim2=-1), f"ggn diag per sample [{layout}]")
    check_metric_products(model, (x,), wrts=("params",), matrices=("identity", "diag", "sqrt"))


def test_chunk_widths_follow_the_budgets(monkeypatch):
    """Automatic chunks: as many columns as keep a per-column stack under the budget (2 MiB with convolutions
    on a CPU), at most MAX_CHUNKS chunks unless that would pass the 1 GiB (GPU) budget, balanced; under
    torch.compile the second body's chunks follow the 1 GiB budget."""
    import fxjac.direction as direction

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(2 * 4 * 4, 7)).double()
    x = torch.randn(3, 1, 4, 4, dtype=torch.float64)
    ref = fxjac.ggn(model, loss="mse", out="diag")(x)[1]  # one chunk: every stack is tiny

    def widths(conv_bytes, gpu_bytes, most_chunks):
        monkeypatch.setattr(direction, "CONV_CHUNK_BYTES", conv_bytes)
        monkeypatch.setattr(direction, "GPU_CHUNK_BYTES", gpu_bytes)
        monkeypatch.setattr(direction, "MAX_CHUNKS", most_chunks)
        p = fxjac.ggn(model, loss="mse", out="diag", example_inputs=(x,))
        assert_close(p(x)[1], ref, "chunked ggn diagonal")
        return p.column_loop_0.widths if hasattr(p, "column_loop_0") else None

    per_column = 3 * 2 * 4 * 4 * 8  # the conv's output stack, the largest, per column (float64)
    assert widths(1, 1 << 30, 128) == [1, 7]  # one column at a time; compiled: one chunk of all 7
    assert widths(2 * per_column, 1 << 30, 128) == [2, 7]  # 7 columns in chunks of 2 (the last padded)
    assert widths(1, 1 << 30, 2) == [4, 7]  # at most 2 chunks: 4 + 3
    assert widths(1, 2 * per_column, 2) == [2]  # ... unless a chunk would pass the GPU budget
    assert widths(1 << 30, 1 << 30, 128) is None
    p = fxjac.ggn(model, loss="mse", out="diag", chunk_size=5, example_inputs=(x,))  # at most 5: balanced, 4 + 3
    assert p.column_loop_0.widths == [4]
    assert_close(p(x)[1], ref, "ggn diagonal in chunks of at most 5")


@pytest.mark.parametrize("name", zoo.names())
def test_every_zoo_model_builds_both_loop_bodies(name, monkeypatch):
    """With a budget of one byte every chunk holds one column eagerly, and the torch.compile body all of them: the
    second body is emitted after the first was outlined, from the same builder, on every zoo model; the eager
    loop matches the dense reference."""
    import fxjac.direction as direction

    monkeypatch.setattr(direction, "CPU_CHUNK_BYTES", 1)
    monkeypatch.setattr(direction, "CONV_CHUNK_BYTES", 1)
    monkeypatch.setattr(direction, "POOLED_CHUNK_BYTES", 0)  # the cnn's pooled convolution: chunks too
    model, _ = zoo.build(name, preset="small")
    model = model.double().eval()
    xs = zoo.example_inputs(name, 2, preset="small", dtype=torch.float64)
    y = model(*xs)
    k = y[0].numel()
    if k < 2:
        pytest.skip("one output column: nothing to chunk")
    p = fxjac.ggn(model, loss="mse", out="diag", example_inputs=xs)
    assert p.column_loop_0.widths == [1, k]
    J = per_sample_jacobian(model, xs, "params")
    assert_close(p(*xs)[1], torch.einsum("bop,boq,bqp->p", J, loss_hessian(y, "mse"), J), f"{name} looped ggn")


def test_chunked_blocks_with_an_unused_parameter():
    """The zero block of a parameter the output never reads does not depend on the columns: it is computed once,
    outside the column loop, which sums the other blocks (a refusal with an operand's K before; found by a probe)."""

    class Spare(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.spare = nn.Linear(3, 8), nn.Linear(8, 3), nn.Linear(8, 8, bias=False)

        def forward(self, x):
            return self.b(torch.tanh(self.a(x)))

    torch.manual_seed(0)
    model = Spare().double().eval()
    x = torch.randn(5, 3, dtype=torch.float64)
    S = torch.randn(5, 3, 4, dtype=torch.float64)
    J = per_sample_jacobian(model, (x,), "params")
    sizes = [p.numel() for p in model.parameters()]
    for name, p, args, G in (
            ("jtmjp sqrt", fxjac.jtmjp(model, wrt="params", matrix="sqrt", out="block", chunk_size=3,
                                       example_inputs=(x,)), (x, S), torch.einsum("bop,bok,bqk,bqr->pr", J, S, S, J)),
            ("ggn mse", fxjac.ggn(model, loss="mse", out="block", chunk_size=2, example_inputs=(x,)), (x,),
             torch.einsum("bop,bor->pr", J, J))):
        assert "column_loop_0(" in p.code, name
        blocks = p(*args)[1]
        assert_close(torch.block_diag(*blocks), _block_diagonal(G, [b.shape[0] for b in blocks]), name)
        assert [b.shape[0] for b in blocks] == [sum(sizes[:2]), sum(sizes[2:4]), sizes[4]] and not blocks[2].any()


@pytest.mark.parametrize("parametrize", ["weight_norm", "spectral_norm", "orthogonal"])
def test_diag_backprop_through_a_weight_parametrization(parametrize):
    """A weight computed from parameters alone (torch.nn.utils.parametrizations) has one local Jacobian A that
    every sample shares: its parameters' diagonals are (A∘A)ᵀ of the weight's, per sample or summed (the
    fallback differentiated it one sample at a time and failed)."""
    from torch.nn.utils import parametrizations

    torch.manual_seed(0)
    lin = getattr(parametrizations, parametrize)(nn.Linear(4, 3)).double().eval()
    x = torch.randn(5, 4, dtype=torch.float64)
    d = torch.rand(5, 3, dtype=torch.float64)
    names = [n for n, _ in lin.named_parameters()]
    originals = {n.split(".")[-1]: q.detach() for n, q in lin.named_parameters() if n != "bias"}
    jacs = torch.func.jacrev(
        lambda *ps: torch.func.functional_call(lin.parametrizations.weight, dict(zip(originals, ps)), ()),
        argnums=tuple(range(len(originals))))(*originals.values())
    d_w = d[:, :, None] * (x * x)[:, None, :]  # one Linear: the exact per-sample diagonal of its weight
    ref = {"bias": d}
    for (name, p), j in zip(originals.items(), jacs):
        ref[f"parametrizations.weight.{name}"] = (d_w.reshape(5, -1) @ (j * j).reshape(12, -1)).reshape(
            (5,) + tuple(p.shape))
    want = torch.cat([ref[n].reshape(5, -1) for n in names], 1)
    for reduce in ("none", "sum"):
        _, r = fxjac.jtmjp(lin, wrt="params", matrix="diag", out="diag", method="diag_backprop",
                           reduce=reduce)(x, d)
        assert_close(r, want if reduce == "none" else want.sum(0), f"{parametrize} diag_backprop reduce={reduce}")


def test_forward_diag_backprop_through_a_weight_made_of_parameters():
    """jmjtp's diagonal pushed forward (nnj's ``(A∘A) d`` op by op) through a weight computed from parameters
    alone (W = a @ b: one local Jacobian every sample shares; the fallback looked for a batch and raised
    StopIteration), then a Linear, against the two ops' squared Jacobians composed by hand."""
    torch.manual_seed(0)

    class LowRank(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Parameter(torch.randn(4, 2, dtype=torch.float64))
            self.b = nn.Parameter(torch.randn(2, 5, dtype=torch.float64))

        def forward(self, x):
            return nn.functional.linear(x, self.a @ self.b)

    model = LowRank()
    x = torch.randn(3, 5, dtype=torch.float64)
    sigma = torch.rand(18, dtype=torch.float64)
    ja, jb = torch.func.jacrev(torch.matmul, argnums=(0, 1))(model.a.detach(), model.b.detach())
    d_w = (ja * ja).reshape(20, 8) @ sigma[:8] + (jb * jb).reshape(20, 10) @ sigma[8:]
    want = (x * x) @ d_w.reshape(4, 5).t()  # y_o = Σ_i x_i W_oi
    _, got = fxjac.jmjtp(model, wrt="params", matrix="diag", out="diag", method="diag_backprop")(x, sigma)
    assert_close(got, want, "forward diag_backprop through W = a @ b")


def test_forward_diag_backprop_through_constants():
    """A comparison used as a mask and a division by a traced size are constants of the forward diagonal as of
    every product (a mask's entries are 0 or 1; they went to the fallback, which refused the comparison, and
    the size raised an AttributeError)."""
    torch.manual_seed(0)

    class Masked(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(4, 3, dtype=torch.float64))

        def forward(self, x):
            h = x @ self.w
            return h.masked_fill(h > 0.5, 0.0) / (h.size(-1) ** 0.5)

    model = Masked()
    x = torch.randn(6, 4, dtype=torch.float64)
    sigma = torch.rand(12, dtype=torch.float64)
    h = x @ model.w.detach()
    want = ((x * x) @ sigma.reshape(4, 3)) * (h <= 0.5) / 3  # h_j = Σ_i x_i w_ij, then the mask, then / √3
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every op has a structured diag_jvp: no fallback warning
        _, got = fxjac.jmjtp(model, wrt="params", matrix="diag", out="diag", method="diag_backprop")(x, sigma)
    assert_close(got, want, "forward diag_backprop through a mask and a size")


def test_forward_diag_backprop_through_a_product_of_two_activations():
    """``h @ hᵀ`` with a diagonal on both operands (attention's scores): ``d_a @ (b∘b) + (a∘a) @ d_b``, each
    operand one input of the op (a structured rule; it went to the fallback's per-sample Jacobians)."""
    torch.manual_seed(0)

    class Scores(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(4, 3, dtype=torch.float64))

        def forward(self, x):
            h = x @ self.w
            return (h @ h.transpose(1, 2)).flatten(1)

    model = Scores()
    x = torch.randn(2, 5, 4, dtype=torch.float64)
    sigma = torch.rand(12, dtype=torch.float64)
    h = x @ model.w.detach()
    d_h = (x * x) @ sigma.reshape(4, 3)
    want = (d_h @ (h * h).transpose(1, 2) + (h * h) @ d_h.transpose(1, 2)).flatten(1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _, got = fxjac.jmjtp(model, wrt="params", matrix="diag", out="diag", method="diag_backprop")(x, sigma)
    assert_close(got, want, "forward diag_backprop through h @ hᵀ")


class _Square(nn.Module):
    def forward(self, x):
        return torch.tanh(x * x)


class _Cancel(nn.Module):
    def forward(self, x):
        return (x - x) + x / x * x


class _SelfProduct(nn.Module):
    def forward(self, h):
        return h @ h


@pytest.mark.parametrize("model, structured", [(_Square(), True), (_Cancel(), True), (_SelfProduct(), False)])
def test_diag_backprop_where_one_node_fills_two_slots(model, structured):
    """Note [one node in two slots] (passes/protocol.py): the op's Jacobian w.r.t. the node is the sum of its
    slots', and the diagonal squares that sum (``x * x`` gave half of ``x ** 2``'s, ``x - x`` three times
    0's). Element-wise chains are exact; one op is exact in both directions (a matmul of ``h`` with itself
    through the fallback, element-wise ops by their own rule)."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 3, dtype=torch.float64)
    A = torch.func.vmap(torch.func.jacrev(model))(x).reshape(2, 9, 9)  # each sample's Jacobian
    d = torch.rand(2, 9, dtype=torch.float64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, back = fxjac.jtmjp(model, matrix="diag", out="diag", method="diag_backprop")(x, d)
        _, fwd = fxjac.jmjtp(model, matrix="diag", out="diag", method="diag_backprop")(x, d)
    assert_close(back.reshape(2, 9), torch.einsum("boi,bo->bi", A * A, d), "backward diagonal")
    assert_close(fwd.reshape(2, 9), torch.einsum("boi,bi->bo", A * A, d), "forward diagonal")
    assert structured == (not [w for w in caught if "fallback" in str(w.message)])


def _eval_batch_norm():
    bn = nn.BatchNorm2d(2).double().eval()
    bn.running_mean.uniform_(-1, 1)
    bn.running_var.uniform_(0.5, 2)
    bn.weight.data.uniform_(-2, 2)
    return bn


def _affine(module):
    """``module`` with its (default 1 and 0) affine parameters drawn, so that squaring them matters."""
    for p in module.parameters():
        p.data.uniform_(-2, 2)
    return module


class _Normalize(nn.Module):
    def forward(self, x):
        return F.normalize(x, dim=-1)


class _OuterOp(nn.Module):
    """``torch.outer`` of a batch of numbers with a parameter vector."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(4))

    def forward(self, x):
        return torch.outer(x, self.w)


class _Reduce(nn.Module):
    """One reduction along the last axis (``max`` with a dim: its values)."""

    def __init__(self, name):
        super().__init__()
        self.name = name

    def forward(self, x):
        if self.name == "max":
            return x.max(dim=-1).values
        if self.name == "vector_norm":
            return torch.linalg.vector_norm(x, dim=-1)
        return getattr(torch, self.name)(x, -1)


class _Einsum(nn.Module):
    """``einsum(eq, x, *weights)``: a contraction over an index of the weights alone sums before it squares."""

    def __init__(self, eq, *shapes):
        super().__init__()
        self.eq = eq
        self.ws = nn.ParameterList(nn.Parameter(torch.randn(*s)) for s in shapes)

    def forward(self, x):
        return torch.einsum(self.eq, x, *self.ws)


@pytest.mark.parametrize("make, shape", [
    (lambda: nn.Conv2d(2, 3, 3, padding=1, stride=2), (3, 2, 6, 6)),
    (lambda: nn.ConvTranspose2d(2, 3, 3, stride=2, padding=1, output_padding=1), (3, 2, 6, 6)),
    (lambda: nn.Conv1d(4, 4, 3, groups=2, dilation=2), (3, 4, 6)),
    (_eval_batch_norm, (3, 2, 6, 6)),
    (lambda: nn.MaxPool2d(2), (3, 2, 6, 6)),
    (lambda: _affine(nn.LayerNorm(5)), (3, 4, 5)),
    (lambda: nn.LayerNorm((4, 5), elementwise_affine=False), (3, 4, 5)),
    (lambda: _affine(nn.RMSNorm(5)), (3, 4, 5)),
    (lambda: _affine(nn.GroupNorm(2, 4)), (3, 4, 3, 3)),
    (lambda: _affine(nn.InstanceNorm2d(2, affine=True)), (3, 2, 3, 3)),
    (lambda: nn.Softmax(dim=1), (3, 4, 5)),
    (lambda: nn.Softmin(dim=-1), (3, 4, 5)),
    (lambda: nn.LogSoftmax(dim=1), (3, 4, 5)),
    (_Normalize, (3, 4, 5)),
    (lambda: _Einsum("bij,jk->bik", (5, 2)), (3, 4, 5)),
    (lambda: _Einsum("bij,jk,kl->bil", (5, 2), (2, 3)), (3, 4, 5)),
    (lambda: _Einsum("bij,ij->bj", (4, 5)), (3, 4, 5)),
    (_OuterOp, (3,)),
    *[((lambda name=name: _Reduce(name)), (3, 4, 5)) for name in ("logsumexp", "amax", "max", "prod", "vector_norm",
                                                                   "mean", "var", "std")],
    (lambda: nn.AvgPool2d(3, stride=2, padding=1, count_include_pad=False), (3, 2, 5, 6)),
    (lambda: nn.AdaptiveAvgPool2d((2, 3)), (3, 2, 5, 7)),
    (lambda: nn.Upsample(scale_factor=2, mode="bilinear"), (3, 2, 3, 4)),
    (lambda: nn.Upsample(size=(5, 7), mode="bicubic", align_corners=True), (3, 2, 3, 4)),
    (lambda: nn.Upsample(scale_factor=3, mode="nearest"), (3, 2, 3, 4)),
], ids=["conv2d", "conv_transpose2d", "conv1d_groups", "batch_norm", "max_pool", "layer_norm", "layer_norm_plain",
        "rms_norm", "group_norm", "instance_norm", "softmax", "softmin", "log_softmax", "normalize",
        "einsum", "einsum_chain", "einsum_elementwise", "outer", "logsumexp", "amax", "max", "prod", "vector_norm",
        "mean", "var", "std", "avg_pool", "adaptive_avg_pool", "bilinear", "bicubic", "nearest"])
def test_forward_diag_backprop_of_one_op_is_exact_and_structured(make, shape):
    """jmjtp's forward diagonal (and jtmjp's backward one) through one convolution, normalisation, softmax,
    reduction, pooling, interpolation or einsum (structured rules: the jvp with squared weights, inputs and
    scales, or a closed form; forward, they went to the fallback's per-sample Jacobians) is the exact
    ``(A∘A) d`` w.r.t. the input and the parameters."""
    torch.manual_seed(0)
    model = make().double()
    x = torch.randn(*shape, dtype=torch.float64)
    cases = [("input", per_sample_jacobian(model, (x,), "input"))]
    if any(True for _ in model.parameters()):
        cases.append(("params", per_sample_jacobian(model, (x,), "params")))
    for wrt, J in cases:
        d = torch.rand(J.shape[2] if wrt == "params" else (shape[0], J.shape[2]), dtype=torch.float64)
        want = torch.einsum("boi,i->bo" if wrt == "params" else "boi,bi->bo", J * J, d)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no fallback warning
            _, got = fxjac.jmjtp(model, wrt=wrt, matrix="diag", out="diag", method="diag_backprop")(x, d)
        assert_close(got.reshape(want.shape), want, f"forward diagonal w.r.t. {wrt}")
        # and backward, (A∘A)ᵀ e, by the op's structured rule too
        e = torch.rand(shape[0], J.shape[1], dtype=torch.float64)
        want = torch.einsum("boi,bo->bi", J * J, e)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            _, got = fxjac.jtmjp(model, wrt=wrt, matrix="diag", out="diag", method="diag_backprop")(x, e)
        assert_close(got.reshape(-1) if wrt == "params" else got.reshape(want.shape),
                     want.sum(0) if wrt == "params" else want, f"backward diagonal w.r.t. {wrt}")


class _Attention(nn.Module):
    """One head of attention: SDPA with its default scale, or the same ops written out."""

    def __init__(self, fused):
        super().__init__()
        self.fused = fused

    def forward(self, x):
        q, k, v = x, x * 0.5, x.flip(-1)
        if self.fused:
            return F.scaled_dot_product_attention(q, k, v)
        return torch.softmax(q @ k.transpose(-1, -2) * (1 / q.shape[-1] ** 0.5), dim=-1) @ v


def test_diag_backprop_through_sdpa_squares_its_default_scale():
    # Probe CC: SDPA's default 1/√E (its own op once SDPA is decomposed) pushed d/√E forward instead of d/E.
    torch.manual_seed(0)
    x = torch.randn(2, 3, 5, 4, dtype=torch.float64)
    d = torch.rand(2, 60, dtype=torch.float64)
    for make in (fxjac.jmjtp, fxjac.jtmjp):
        fused, plain = (make(_Attention(f), matrix="diag", out="diag", method="diag_backprop")(x, d)[1]
                        for f in (True, False))
        assert_close(fused, plain, f"{make.__name__}: SDPA against its ops written out")


class _Bags(nn.Module):
    """EmbeddingBag over 2-D ids, weighted by the input (``sum``), or a ``mean`` / ``max`` of rows."""

    def __init__(self, mode):
        super().__init__()
        self.mode = mode
        self.bag = nn.EmbeddingBag(7, 3, mode=mode, padding_idx=2)

    def forward(self, w, ids):
        return self.bag(ids, per_sample_weights=w if self.mode == "sum" else None)


@pytest.mark.parametrize("mode", ["sum", "mean", "max"])
def test_diag_backprop_of_an_embedding_bag_is_exact_and_structured(mode):
    # Probe CC: EmbeddingBag's forward diagonal went to the fallback. A row repeated in a bag (5 twice) enters
    # with its summed coefficient, squared after summing.
    torch.manual_seed(0)
    model = _Bags(mode).double()
    ids = torch.tensor([[0, 2, 5, 5], [6, 1, 2, 0]])
    w = torch.rand(2, 4, dtype=torch.float64)
    cases = [("params", per_sample_jacobian(model, (w, ids), "params"))]
    if mode == "sum":
        cases.append(("input", per_sample_jacobian(model, (w, ids), "input")))
    for wrt, J in cases:
        d = torch.rand(J.shape[2] if wrt == "params" else (2, J.shape[2]), dtype=torch.float64)
        want = torch.einsum("boi,i->bo" if wrt == "params" else "boi,bi->bo", J * J, d)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no fallback warning
            _, got = fxjac.jmjtp(model, wrt=wrt, matrix="diag", out="diag", method="diag_backprop")(w, ids, d)
        assert_close(got, want, f"forward diagonal of an EmbeddingBag({mode}) w.r.t. {wrt}")


def test_forward_diag_backprop_of_an_embedding_is_exact_and_structured():
    """An embedding's output entries each read one weight entry (0 at the padding row): the forward diagonal is
    the jvp's gather of the diagonal (it went to the fallback)."""
    torch.manual_seed(0)
    model = nn.Embedding(7, 3, padding_idx=2).double()
    idx = torch.tensor([[0, 2, 5, 5], [6, 1, 2, 0]])
    J = per_sample_jacobian(model, (idx,), "params")
    d = torch.rand(J.shape[2], dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback warning
        _, got = fxjac.jmjtp(model, wrt="params", matrix="diag", out="diag", method="diag_backprop")(idx, d)
    assert_close(got.reshape(2, -1), torch.einsum("boi,i->bo", J * J, d), "forward diagonal of an embedding")


@pytest.mark.parametrize("torch_loss, loss, divisor", [
    (nn.MSELoss(reduction="sum"), "mse", lambda y: 0.5),
    (nn.MSELoss(), "mse", lambda y: 0.5 * y.numel()),
    (nn.CrossEntropyLoss(), "cross_entropy", lambda y: y.shape[0]),
    (nn.BCEWithLogitsLoss(), "bce", lambda y: y.numel()),
])
def test_the_readme_matches_torch_losses(torch_loss, loss, divisor):
    """README, "Matching a torch loss": the Gauss-Newton of a torch loss is fxjac's divided by these numbers."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    x = torch.randn(5, 4, dtype=torch.float64)
    y = net(x).detach()
    t = torch.randint(0, 3, (5,)) if loss == "cross_entropy" else torch.rand(5, 3, dtype=torch.float64)
    J = per_sample_jacobian(net, (x,), "params")  # [B, O, P]
    H = torch.func.hessian(lambda out: torch_loss(out, t))(y).reshape(15, 15)  # over all outputs, block diagonal
    Hb = torch.stack([H[3 * b:3 * b + 3, 3 * b:3 * b + 3] for b in range(5)])
    ref = torch.einsum("bop,boq,bqr->pr", J, Hb, J)
    _, got = fxjac.ggn(net, loss=loss, out="full")(x, target=t)
    assert_close(got / divisor(y), ref, f"ggn({loss!r}) against {torch_loss}")


def test_cross_entropy_over_one_logit_has_no_curvature():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 1)).double()
    x = torch.randn(5, 4, dtype=torch.float64)
    _, got = fxjac.ggn(net, loss="cross_entropy")(x)
    assert torch.count_nonzero(got.abs() > 1e-12) == 0
    _, bce = fxjac.ggn(net, loss="bce")(x)
    assert bce.abs().max() > 1e-3
