"""The public contract: options, wrt selection, compile-once behaviour, errors."""

import dataclasses
import re
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from reference import assert_close, per_sample_jacobian

import fxjac


def rng(seed=0):
    return torch.Generator().manual_seed(seed)


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).double()


def randn(*shape, g=None):
    return torch.randn(*shape, generator=g or rng(), dtype=torch.float64)


# --- compile once ----------------------------------------------------------------------------------------


def test_product_follows_optimizer_steps_without_retracing():
    model = mlp()
    x, w = randn(4, 3), randn(4, 2, g=rng(1))
    p = fxjac.vjp(model, wrt="params")
    _, before = p(x, w)
    code = p.code
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    model(x).pow(2).sum().backward()
    opt.step()
    _, after = p(x, w)
    assert p.code == code
    J = per_sample_jacobian(model, (x,), "params")
    assert_close(after, torch.einsum("bop,bo->p", J, w), "vjp after optimizer.step")
    assert (after - before).abs().max() > 1e-3


def test_product_follows_load_state_dict_assign():
    model = mlp(0)
    other = mlp(1)
    x, v = randn(4, 3), randn(4, 3, g=rng(2))
    p = fxjac.jvp(model)
    p(x, v)
    model.load_state_dict(other.state_dict(), assign=True)
    _, t = p(x, v)
    ref = torch.func.jvp(other, (x,), (v,))[1]
    assert_close(t, ref, "jvp after load_state_dict(assign=True)")


def test_batch_size_changes_between_calls():
    model = mlp()
    p = fxjac.jvp(model, example_inputs=(randn(2, 3),))
    for b in (1, 5, 9):
        x, v = randn(b, 3), randn(b, 3, g=rng(b))
        _, t = p(x, v)
        assert_close(t, torch.func.jvp(model, (x,), (v,))[1], f"jvp at batch {b}")


def test_generated_code_has_no_python_loops_and_is_readable():
    p = fxjac.mjp(mlp(), wrt="params", reduce="none", example_inputs=(randn(2, 3),))
    code = p.code
    assert "for " not in code and "vmap" not in code
    assert "linear" in code


def test_results_are_detached_unless_differentiable():
    model = mlp()
    x, v = randn(3, 3), randn(3, 3, g=rng(1))
    _, t = fxjac.jvp(model)(x, v)
    assert t.grad_fn is None and not t.requires_grad
    _, t2 = fxjac.jvp(model, differentiable=True)(x, v)
    assert t2.requires_grad
    g = torch.autograd.grad(t2.sum(), model[0].weight)[0]
    ref = torch.autograd.grad(torch.func.jvp(model, (x,), (v,))[1].sum(), model[0].weight)[0]
    assert_close(g, ref, "gradient through a differentiable product")


# --- wrt -------------------------------------------------------------------------------------------------


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 3)
        self.fc2 = nn.Linear(3, 2)
        self.frozen = nn.Linear(3, 3)
        self.frozen.requires_grad_(False)
        self.again = self.fc  # the same module (and parameters) under a second name

    def forward(self, x):
        return self.fc2(torch.tanh(self.again(torch.tanh(self.fc(x))) + self.frozen(x)))


def test_tied_parameters_accumulate_and_frozen_are_excluded():
    torch.manual_seed(0)
    model = Tied().double()
    x, w = randn(4, 3), randn(4, 2, g=rng(3))
    p = fxjac.vjp(model, wrt="params")
    _, g = p(x, w)
    assert p.wrt_names == ["fc.weight", "fc.bias", "fc2.weight", "fc2.bias"]
    J = per_sample_jacobian(model, (x,), "params")
    assert_close(g, torch.einsum("bop,bo->p", J, w), "vjp with a tied module")


def test_wrt_prefix_matches_whole_parts_and_aliases():
    torch.manual_seed(0)
    model = Tied().double()
    p = fxjac.vjp(model, wrt=["fc"])
    assert p.wrt_names == ["fc.weight", "fc.bias"]
    assert fxjac.vjp(model, wrt=["again.weight"]).wrt_names == ["fc.weight"]
    x, w = randn(4, 3), randn(4, 2, g=rng(3))
    _, g = p(x, w)
    J = per_sample_jacobian(model, (x,), "params", ["fc"])
    assert_close(g, torch.einsum("bop,bo->p", J, w), "vjp w.r.t. a prefix")


def test_wrt_errors_name_the_nearest_parameters():
    model = Tied().double()
    with pytest.raises(fxjac.OptionError, match="fc2.weight"):
        fxjac.vjp(model, wrt=["fc2.wieght"])
    with pytest.raises(fxjac.OptionError, match="frozen"):
        fxjac.vjp(model, wrt=["frozen"])
    with pytest.raises(ValueError):  # OptionError is a ValueError
        fxjac.jvp(model, wrt=42)
    with pytest.raises(fxjac.OptionError, match="bad wrt entry 3"):  # a raw TypeError (probe GG)
        fxjac.vjp(model, wrt=[3])


def test_unflatten_follows_the_layout():
    model = mlp()
    p = fxjac.vjp(model, wrt="params", reduce="none")
    x, w = randn(4, 3), randn(4, 2, g=rng(1))
    _, g = p(x, w)
    parts = fxjac.unflatten(p, g)
    assert list(parts) == p.wrt_names
    assert parts["0.weight"].shape == (4, 5, 3)
    per_sample = torch.func.vmap(
        lambda xb, wb: torch.func.grad(lambda prm: (torch.func.functional_call(model, prm, (xb[None],))[0] * wb)
                                       .sum())(dict(model.named_parameters())))(x, w)
    assert_close(parts["0.weight"], per_sample["0.weight"], "per-sample gradient of 0.weight")


def test_second_input_and_output_selection():
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(3, 2)
            self.b = nn.Linear(4, 2)

        def forward(self, x, z):
            h = self.a(x) * torch.sigmoid(self.b(z))
            return {"out": h, "aux": h.sum(-1)}

    torch.manual_seed(0)
    model = Two().double()
    x, z = randn(5, 3), randn(5, 4, g=rng(1))
    v = randn(5, 4, g=rng(2))
    _, t = fxjac.jvp(model, wrt="input:1", output="out")(x, z, v)
    ref = torch.func.jvp(lambda zz: model(x, zz)["out"], (z,), (v,))[1]
    assert_close(t, ref, "jvp w.r.t. the second input of a dict output")
    with pytest.raises(fxjac.OptionError, match="output="):
        fxjac.jvp(model, example_inputs=(x, z))


def test_output_selects_a_field_of_torch_return_types():
    # Probe Z: torch.topk's result (a structseq with fields values, indices) by field name raised a TraceError.
    class TopK(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 6)

        def forward(self, x):
            return torch.topk(self.lin(x), 3, dim=-1)

    torch.manual_seed(0)
    model = TopK().double()
    x = randn(3, 4)
    y, J = fxjac.jacobian(model, output="values")(x)
    ref = torch.func.vmap(torch.func.jacrev(lambda s: model(s[None]).values[0]))(x)
    assert_close(y, model(x).values, "primal of output='values'")
    assert_close(J, ref, "jacobian of output='values'")
    with pytest.raises(fxjac.OptionError, match="fields"):
        fxjac.jacobian(model, output="vals", example_inputs=(x,))


@dataclasses.dataclass
class _Out:
    logits: torch.Tensor
    features: torch.Tensor


class _ReturnsDataclass(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3)

    def forward(self, x):
        h = torch.tanh(x)
        return _Out(features=h, logits=self.lin(h))


@pytest.mark.parametrize("output", ["logits", 0])
def test_output_selects_a_field_of_a_dataclass(output):
    # Probe GG: a dataclass output (HuggingFace's ModelOutput is one) was a TraceError ("not subscriptable").
    torch.manual_seed(0)
    model = _ReturnsDataclass().double()
    x, w = randn(3, 4), randn(3, 3)
    y, got = fxjac.vjp(model, output=output)(x, w)
    ref, pull = torch.func.vjp(lambda u: model(u).logits, x)
    assert_close(y, ref, "primal of the logits field")
    assert_close(got, pull(w)[0], "vjp of the logits field")
    _, J = fxjac.jacobian(model, output="features")(x)
    assert_close(J, torch.func.vmap(torch.func.jacrev(lambda s: model(s[None]).features[0]))(x), "features' jacobian")


class _Cache:
    pass


class _ReturnsADictWithACache(nn.Module):
    """A Hugging Face-like output: a dict whose first entry is None (``loss``), then the logits, then an object
    a graph cannot hold (a key/value cache) unless ``use_cache`` is off."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3)

    def forward(self, x, use_cache=False):
        return {"loss": None, "logits": self.lin(x), "past": _Cache() if use_cache else None}


def test_output_by_position_in_a_dict_and_an_output_holding_an_object():
    # Probe CC: output=0 on a ModelOutput (whose out[0] is its first entry that is not None) selected nothing; a
    # cache object in the output got an unrelated hint about sizes.
    torch.manual_seed(0)
    model = _ReturnsADictWithACache().double()
    x, w = randn(3, 4), randn(3, 3)
    y, got = fxjac.vjp(model, output=0)(x, w)
    assert_close(y, model.lin(x), "output=0: the logits")
    assert_close(got, w @ model.lin.weight, "vjp of output=0")
    with pytest.raises(fxjac.OptionError, match=r"output=1 selects nothing from the model's output \(a dict with"):
        fxjac.vjp(model, output=1, example_inputs=(x,))
    with pytest.raises(fxjac.TraceError, match=r"the model's output \(or a call's argument\) holds another object"):
        fxjac.vjp(model, output="logits", concrete_args={"use_cache": True}, example_inputs=(x,))


class _ReadsADictInput(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3)

    def forward(self, batch):
        return self.lin(batch["x"]) * batch["m"]


def test_products_with_columns_refuse_a_container_as_first_input():
    # Probe CF: a raw AttributeError ('dict' object has no attribute 'shape') at the build; the summed vjp works.
    model = _ReadsADictInput().double()
    batch = {"x": randn(2, 4), "m": randn(2, 3)}
    for make in (lambda: fxjac.ggn(model, loss="mse", out="diag", example_inputs=(batch,)),
                 lambda: fxjac.jacobian(model, wrt="params", example_inputs=(batch,))):
        with pytest.raises(fxjac.UnsupportedOpError, match="take the batch size from the first input, and it is a "
                                                           "dict: give the model its tensors as separate arguments"):
            make()
    _, got = fxjac.vjp(model, wrt="params", example_inputs=(batch,))(batch, randn(2, 3))
    ref = torch.autograd.grad((model(batch) * randn(2, 3)).sum(), list(model.parameters()))
    assert_close(got, torch.cat([g.flatten() for g in ref]), "summed vjp with a dict input")


class _ReturnsExtras(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3)

    def forward(self, x):
        return self.lin(x), 3, None, {"features": x}


@pytest.mark.parametrize("output, what", [(1, "int"), (2, "NoneType"), (3, "dict")])
def test_output_selecting_a_value_that_is_no_tensor_is_an_option_error(output, what):
    # Probe GG: a raw AttributeError ("'int' object has no attribute 'meta'").
    with pytest.raises(fxjac.OptionError, match=f"output={output} selects a value of type {what} from the model"):
        fxjac.vjp(_ReturnsExtras().double(), output=output)(randn(3, 4), randn(3, 3))


# --- fallback, strict, errors ------------------------------------------------------------------------------


class Cumulative(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return torch.special.erfc(self.fc(x)).cummax(-1).values


def test_fallback_is_exact_and_named_and_strict_refuses():
    torch.manual_seed(0)
    model = Cumulative().double()
    x, w = randn(3, 4), randn(3, 4, g=rng(1))
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        p = fxjac.vjp(model, wrt="params", example_inputs=(x,))
    assert any("no structured rule" in str(r.message) and "erfc" in str(r.message) for r in rec)
    # The line named is the user's (torch.fx records its own frames after it).
    assert any(f'{__file__}", line' in str(r.message) and "return torch.special.erfc(self.fc(x))" in str(r.message)
               and "torch/fx" not in str(r.message) for r in rec)
    _, g = p(x, w)
    J = per_sample_jacobian(model, (x,), "params")
    assert_close(g, torch.einsum("bop,bo->p", J, w), "vjp through fallback ops")
    with pytest.raises(fxjac.UnsupportedOpError) as err:
        fxjac.vjp(model, strict=True, example_inputs=(x,))
    assert "erfc" in str(err.value) and "cummax" in str(err.value)


def test_operand_errors():
    model = mlp()
    x = randn(4, 3)
    p = fxjac.jvp(model)
    with pytest.raises(fxjac.ShapeError, match="shape"):
        p(x, randn(4, 4))
    with pytest.raises(fxjac.ShapeError, match="dtype"):
        p(x, torch.randn(4, 3))
    with pytest.raises(fxjac.OptionError):
        fxjac.vjp(model, reduce="mean")
    with pytest.raises(fxjac.OptionError):
        fxjac.jvp(model, chunk_size=0)
    with pytest.raises(fxjac.OptionError):
        fxjac.jvp(model, colour="red")


def test_training_mode_is_refused():
    model = nn.Sequential(nn.Linear(3, 3), nn.Dropout(0.5), nn.BatchNorm1d(3)).double()
    with pytest.raises(fxjac.ModeError, match="eval"):
        fxjac.jvp(model)
    model.eval()
    x, v = randn(4, 3), randn(4, 3, g=rng(1))
    _, t = fxjac.jvp(model)(x, v)
    assert_close(t, torch.func.jvp(model, (x,), (v,))[1], "jvp in eval mode")


def test_untraceable_model_names_the_line_and_leaf_modules_fix_it():
    class Branchy(nn.Module):
        def forward(self, x):
            if x.sum() > 0:
                return x * 2
            return -x

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 3)
            self.branch = Branchy()

        def forward(self, x):
            return self.branch(self.fc(x))

    model = Net().double()
    with pytest.raises(fxjac.TraceError, match="leaf_modules") as err:
        fxjac.jvp(model)
    assert "if x.sum() > 0" in str(err.value)
    x, v = randn(4, 3), randn(4, 3, g=rng(1))
    _, t = fxjac.jvp(model, leaf_modules=[Branchy])(x, v)
    assert_close(t, torch.func.jvp(model, (x,), (v,))[1], "jvp with a user leaf module")


def test_replaced_submodule_makes_the_product_stale():
    model = mlp()
    x, v = randn(4, 3), randn(4, 3, g=rng(1))
    p = fxjac.jvp(model)
    p(x, v)
    model[0] = nn.Linear(3, 5).double()
    with pytest.raises(fxjac.StaleProductError):
        p(x, v)


def test_in_place_ops_are_followed():
    class InPlace(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 3)

        def forward(self, x):
            h = self.fc(x)
            skip = h  # an alias: it sees every mutation below
            h += x
            h.mul_(2.0)
            h = F.relu(h, inplace=True)
            return h + skip

    torch.manual_seed(0)
    model = InPlace().double()
    x, v = randn(4, 3), randn(4, 3, g=rng(1))
    _, t = fxjac.jvp(model)(x, v)
    J = per_sample_jacobian(model, (x,), "input")
    assert_close(t, torch.einsum("boi,bi->bo", J, v), "jvp through in-place ops")


def test_non_differentiable_ops_are_constants():
    class Masked(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 3)

        def forward(self, x):
            h = self.fc(x)
            idx = h.argmax(-1, keepdim=True)
            mask = (h > 0).to(h.dtype)
            n = h.shape[-1] // 1
            return torch.where(h > 0.1, h, -h) * mask + h.gather(-1, idx).expand(-1, n) + x.long().to(h.dtype)

    torch.manual_seed(0)
    model = Masked().double()
    x, w = randn(4, 3), randn(4, 3, g=rng(1))
    _, g = fxjac.vjp(model, wrt="params")(x, w)
    J = per_sample_jacobian(model, (x,), "params")
    assert_close(g, torch.einsum("bop,bo->p", J, w), "vjp with masks, argmax and casts")


def test_compile_by_name():
    model = mlp()
    p = fxjac.compile(model, "jtmjp", wrt="params", out="diag")
    x = randn(3, 3)
    _, d = p(x)
    J = per_sample_jacobian(model, (x,), "params")
    assert_close(d, (J * J).sum((0, 1)), "jtmjp by name")
    with pytest.raises(fxjac.OptionError):
        fxjac.compile(model, "hessian")
    with pytest.raises(fxjac.OptionError, match="need backend="):
        fxjac.compile(model, "vjp", dynamic=False)
    c = fxjac.compile(model, "jtmjp", wrt="params", out="diag", backend="eager", dynamic=False, mode="default")
    assert (c.dynamic, c.mode) == (False, "default")
    assert_close(c(x)[1], d, "jtmjp by name, compiled with torch.compile's own options")


class SeqFirst(nn.Module):
    """Batch moved off axis 0 inside: a sequence-first encoder layer between two transposes."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(3, 4)
        self.layer = nn.TransformerEncoderLayer(4, 2, dim_feedforward=6, dropout=0.0)  # batch_first=False
        self.out = nn.Linear(4, 2)

    def forward(self, x):  # x: [B, T, 3]
        h = self.inp(x).transpose(0, 1)  # [T, B, 4]
        h = self.out(self.layer(h))  # a Linear on [T, B, d]: its per-sample weight gradients sum over T, not B
        return h.transpose(0, 1).flatten(1)


def test_values_with_the_batch_off_axis_zero():
    torch.manual_seed(0)
    model = SeqFirst().double().eval()
    x = randn(3, 5, 3)
    w = randn(3, 10, g=rng(4))
    J = per_sample_jacobian(model, (x,), "params")
    _, g = fxjac.vjp(model, wrt="params", reduce="none")(x, w)
    assert_close(g, torch.einsum("bop,bo->bp", J, w), "per-sample grads with a sequence-first layer")
    _, d = fxjac.jtmjp(model, wrt="params", out="diag")(x)
    assert_close(d, (J * J).sum((0, 1)), "JᵀJ diagonal with a sequence-first layer")


def test_forward_arguments_with_defaults_are_constants():
    class Scaled(nn.Module):
        def forward(self, x, scale=2.0, mask=None):
            return x * scale if mask is None else x * mask

    x, v = randn(3, 4), randn(3, 4, g=rng(1))
    _, t = fxjac.jvp(Scaled())(x, v)
    assert_close(t, 2 * v, "jvp with default arguments")
    up = nn.ConvTranspose2d(2, 3, 3).double()  # forward(input, output_size=None) as the root
    xi, vi = randn(2, 2, 4, 4), randn(2, 2, 4, 4, g=rng(2))
    _, ti = fxjac.jvp(up)(xi, vi)
    assert_close(ti, torch.func.jvp(up, (xi,), (vi,))[1], "jvp of a bare ConvTranspose2d")


@pytest.mark.parametrize("make", [lambda: nn.BatchNorm2d(3), lambda: nn.TransformerEncoderLayer(
    4, 2, 6, dropout=0.0, batch_first=True), lambda: nn.MultiheadAttention(4, 2, batch_first=True)],
    ids=["batchnorm", "encoder_layer", "mha"])
def test_a_decomposed_module_as_the_root(make):
    torch.manual_seed(0)
    m = make().double().eval()
    if isinstance(m, nn.BatchNorm2d):
        x = randn(2, 3, 4, 4)
        model, kw = m, {}
    else:
        x = randn(2, 5, 4)
        model, kw = m, ({"output": 0} if isinstance(m, nn.MultiheadAttention) else {})
    args = (x, x, x) if isinstance(m, nn.MultiheadAttention) else (x,)
    y = model(*args)
    y = y[0] if isinstance(y, tuple) else y
    w = randn(*y.shape, g=rng(3))
    _, g = fxjac.vjp(model, **kw)(*args, w)
    ref = torch.func.vjp(lambda a: (model(a, *args[1:])[0] if kw else model(a)), x)[1](w)[0]
    assert_close(g, ref, "vjp of a decomposed root module")


def test_many_compiled_products_in_one_process():
    """Each product compiles its own generated forward: more products than dynamo's per-code cache limit."""
    results = []
    for i in range(10):
        torch.manual_seed(i)
        model = nn.Sequential(nn.Linear(3, 4 + i), nn.Tanh(), nn.Linear(4 + i, 2)).double()
        c = fxjac.compile(model, "vjp", backend="eager", wrt="params")
        for b in (3, 5):
            x, w = randn(b, 3), randn(b, 2, g=rng(b))
            _, g = c(x, w)
            J = per_sample_jacobian(model, (x,), "params")
            results.append(((g - torch.einsum("bop,bo->p", J, w)).abs().max() / J.abs().max()).item())
    assert max(results) < 1e-10


class Recurrent(nn.Module):
    """An nn.GRU stays a leaf: the autograd fallback, per sample by a loop where vmap cannot batch it."""

    def __init__(self):
        super().__init__()
        self.rnn = nn.GRU(3, 4, batch_first=True)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        out, _ = self.rnn(x)
        return self.fc(out[:, -1])


def test_rnn_leaf_through_the_fallback():
    from reference import check_direction_products, check_metric_products

    torch.manual_seed(0)
    model = Recurrent().double()
    x = randn(3, 5, 3)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        fxjac.vjp(model, wrt="params", example_inputs=(x,))
    assert any("GRU" in str(r.message) for r in rec)
    check_direction_products(model, (x,), products=("jvp", "vjp", "mjp"))
    check_metric_products(model, (x,), matrices=("diag",), wrts=("params",))


def test_shape_templates_carrying_a_derivative_keep_their_structured_rules():
    # view_as / reshape_as / expand_as read their second tensor for its shape only; Rule.diff lists it, so a
    # tangent flowing through it does not send the op to the fallback.
    class Templates(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)
            self.w = nn.Parameter(torch.randn(4, dtype=torch.float64))

        def forward(self, x):
            h = self.fc(x)
            return self.w.expand_as(h) * h + x.view_as(h) + x.reshape_as(h)

    from reference import check_direction_products

    model = Templates().double()
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        check_direction_products(model, (randn(3, 4),), products=("jvp", "vjp"))
    assert not [r for r in rec if "fallback" in str(r.message)]


def test_untraceable_builtins_become_leaves():
    # nn.Softmax2d and nn.LocalResponseNorm branch on input.dim(); spectral norm's parametrisation on weight.ndim.
    # torch.fx cannot trace into them, so they become leaves for the autograd fallback.
    from reference import check_direction_products

    torch.manual_seed(0)
    conv = nn.Sequential(nn.Conv2d(2, 4, 3), nn.Softmax2d(), nn.LocalResponseNorm(2), nn.Flatten()).double()
    spectral = nn.Sequential(nn.utils.parametrizations.spectral_norm(nn.Linear(4, 3)), nn.Tanh()).double().eval()
    for model, x in ((conv, randn(2, 2, 5, 5)), (spectral, randn(3, 4))):
        with warnings.catch_warnings(record=True) as rec:
            warnings.simplefilter("always")
            fxjac.vjp(model, wrt="params", example_inputs=(x,))
        assert any("fallback" in str(r.message) for r in rec)
        check_direction_products(model, (x,), products=("jvp", "vjp", "mjp"))


def test_deepcopy_of_a_product_computes_with_a_copy_of_the_model():
    import copy

    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    x, w = randn(5, 3), randn(5, 2, g=rng(1))
    p = fxjac.vjp(model, wrt="params")
    _, g = p(x, w)
    q = copy.deepcopy(p)
    assert_close(q(x, w)[1], g, "vjp of the copy")
    with torch.no_grad():
        q.model[0].weight.mul_(2.0)
    twice = copy.deepcopy(model)
    with torch.no_grad():
        twice[0].weight.mul_(2.0)
    J = per_sample_jacobian(twice, (x,), "params")
    assert_close(q(x, w)[1], torch.einsum("bop,bo->p", J, w), "vjp of the copy after changing its model")
    assert_close(p(x, w)[1], g, "vjp of the original, unchanged")


def test_a_deep_copy_builds_its_siblings_and_its_first_call_on_its_own_model():
    # probe TT: a copy's [B, P] sibling was built from the original model (wrong numbers once they differed), and a
    # copy made before the first call failed it with "the model's submodule '' was replaced"
    import copy
    import pickle

    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    x = randn(5, 3)
    p = fxjac.jvp(model, wrt="params", example_inputs=(x,))
    q, lazy = copy.deepcopy(p), copy.deepcopy(fxjac.jacobian(model, wrt="params"))
    with torch.no_grad():
        model[0].weight.mul_(3.0)  # the original changes; the copies' models do not
    J = per_sample_jacobian(q.model, (x,), "params")
    V = randn(5, 26, g=rng(2))
    assert_close(q(x, V)[1], torch.einsum("bop,bp->bo", J, V), "per-sample tangents through the copy")
    assert_close(lazy(x)[1], per_sample_jacobian(lazy.model, (x,), "params"), "a copy built at its first call")
    with pytest.raises(TypeError, match="cannot be pickled.*state_dict"):
        pickle.dumps(p)


class StackedLSTMs(nn.Module):
    """The first LSTM's state ``(h, c)`` is handed whole, a tuple-valued node, to the second."""

    def __init__(self):
        super().__init__()
        self.a = nn.LSTM(3, 4, batch_first=True)
        self.b = nn.LSTM(4, 4, batch_first=True)

    def forward(self, x):
        out, state = self.a(x)
        return self.b(out.flip(1), state)[0].flatten(1)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_tuple_state_handed_between_recurrent_leaves(dtype):
    """In float32 on a CPU an LSTM runs oneDNN's kernel, whose backward torch.func cannot run (its workspace is
    kept for autograd only): the fallback runs ATen's own RNN kernels (every reverse product had failed)."""
    from reference import check_direction_products

    torch.manual_seed(0)
    check_direction_products(StackedLSTMs().to(dtype), (randn(3, 4, 3).to(dtype),), dtype=dtype,
                             products=("jvp", "vjp", "mjp", "jacobian"))


def test_fallback_loops_where_vmap_returns_wrong_shapes():
    # torch 2.13's batching rule for prelu's backward, nested in the per-sample vmap, returns the batch where
    # the columns belong (a [1, B, 4] slope cotangent came back [B, B, 4]). The fallback checks the shapes and
    # loops over the samples instead; the values must be the per-sample vjps.
    from fxjac.rules.fallback import fallback_vjp

    x, a, ct = randn(3, 4), randn(4, g=rng(1)), randn(1, 3, 4, g=rng(2))
    got_x, got_a = fallback_vjp("torch.prelu", ("__fxjac_slot_0__", "__fxjac_slot_1__"), {}, (x, a), ct,
                                (0, None), per_sample=True)
    for i in range(3):
        ref_x, ref_a = torch.func.vjp(torch.prelu, x[i:i + 1], a)[1](ct[0, i:i + 1])
        assert_close(got_x[0, i], ref_x[0], f"input cotangent of sample {i}")
        assert_close(got_a[0, i], ref_a, f"slope cotangent of sample {i}")


# --- parameter-space results written once (Note [flat writes]) ----------------------------------------------


def _check_param_vjps(model, x, names=None, what="", **options):
    """Summed and per-sample ``vjp`` and ``mjp`` (K = 3) w.r.t. the parameters ``names`` against the float64
    per-sample Jacobian from torch.func; the results are written into one stack, never concatenated.
    """
    wrt = "params" if names is None else names
    J = per_sample_jacobian(model, (x,), "params", names)  # [B, O, P]
    B, O = J.shape[:2]
    y = model(x)
    w, M = randn(*y.shape, g=rng(7)), randn(B, 3, O, g=rng(8))
    ref_w, ref_m = torch.einsum("bop,bo->bp", J, w.reshape(B, O)), torch.einsum("bko,bop->bkp", M, J)
    for reduce in ("sum", "none"):
        pv, pm = fxjac.vjp(model, wrt=wrt, reduce=reduce, **options), fxjac.mjp(model, wrt=wrt, reduce=reduce,
                                                                                **options)
        _, g = pv(x, w)
        _, r = pm(x, M)
        assert "cat" not in pv.code and "cat" not in pm.code
        assert_close(g, ref_w if reduce == "none" else ref_w.sum(0), f"vjp[{what}, reduce={reduce}]")
        assert_close(r, ref_m if reduce == "none" else ref_m.sum(0), f"mjp[{what}, reduce={reduce}]")


def test_param_vjp_and_mjp_of_an_mlp_per_sample_and_summed():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    _check_param_vjps(model, randn(6, 3), what="mlp")


class TiedWeights(nn.Module):
    """A weight read three times: by two Linears and, transposed, as a decoder; and a module called twice."""

    def __init__(self):
        super().__init__()
        self.enc = nn.Linear(4, 4)
        self.mid = nn.Linear(4, 4)
        self.mid.weight = self.enc.weight
        self.out = nn.Linear(4, 3)

    def forward(self, x):
        h = torch.tanh(self.enc(x))
        h = torch.tanh(self.mid(h))
        h = torch.tanh(F.linear(h, self.enc.weight.t()))
        return self.out(torch.tanh(self.out(h)[..., :1] * h))


class Twice(nn.Module):
    def __init__(self):
        super().__init__()
        self.cell = nn.Linear(3, 3)
        self.head = nn.Linear(3, 2)

    def forward(self, x):
        return self.head(torch.tanh(self.cell(torch.tanh(self.cell(x)))))


def test_param_vjp_and_mjp_with_tied_weights_add_the_contributions():
    torch.manual_seed(0)
    model = TiedWeights().double()
    assert fxjac.vjp(model, wrt="params").wrt_names == ["enc.weight", "enc.bias", "mid.bias", "out.weight",
                                                         "out.bias"]
    _check_param_vjps(model, randn(5, 4), what="tied weights")
    _check_param_vjps(Tied().double(), randn(5, 3), what="tied module")
    # a leaf module called twice reads its parameters through two get_attr nodes: the second adds into the block
    model = Twice().double()
    p = fxjac.vjp(model, wrt="params", reduce="none", leaf_modules=(nn.Linear,), example_inputs=(randn(5, 3),))
    assert p.code.count("flat_store(") == 6
    _check_param_vjps(model, randn(5, 3), what="leaf module called twice", leaf_modules=(nn.Linear,))


class Positions(nn.Module):
    """Linears on ``[B, T, d]`` and ``[B, T, U, d]``: each weight is read at several positions per sample."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 5)
        self.b = nn.Linear(5, 3)
        self.c = nn.Linear(3, 2)

    def forward(self, x):
        h = torch.tanh(self.a(x))  # [B, T, 5]
        h = torch.tanh(self.b(h.unsqueeze(2) * h.unsqueeze(1)))  # [B, T, T, 3]
        return self.c(h.mean(1))  # [B, T, 2]


def test_param_vjp_and_mjp_of_linears_at_several_positions():
    torch.manual_seed(0)
    _check_param_vjps(Positions().double(), randn(4, 3, 4), what="positions")


class Unused(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 4)
        self.head = nn.Linear(4, 2)
        self.spare = nn.Parameter(torch.randn(3))  # selected, never read: its columns are zeros

    def forward(self, x):
        return self.head(torch.tanh(self.fc(x)))


def test_param_vjp_and_mjp_with_frozen_unused_and_selected_parameters():
    torch.manual_seed(0)
    model = Tied().double()  # a frozen Linear still acts
    x = randn(5, 3)
    _check_param_vjps(model, x, what="frozen layer")
    _check_param_vjps(model, x, names=["fc2"], what="wrt fc2")
    _check_param_vjps(model, x, names=["fc.bias", "fc2.weight"], what="wrt a bias and a weight")
    model = Unused().double()
    _check_param_vjps(model, x, what="unused parameter")
    p = fxjac.vjp(model, wrt="params", reduce="none")
    assert (fxjac.unflatten(p, p(x, randn(5, 2))[1])["spare"] == 0).all()


def test_per_sample_vjp_is_differentiable():
    """``differentiable=True``: the blocks are copied (autograd does not record ``out=``), gradients flow."""
    torch.manual_seed(0)
    model = mlp()
    x, w = randn(4, 3), randn(4, 2, g=rng(1))
    _, g = fxjac.vjp(model, wrt="params", reduce="none", differentiable=True)(x, w)
    params = dict(model.named_parameters())

    def per_sample(prm):
        def one(xb, wb):
            return torch.func.grad(lambda p: (torch.func.functional_call(model, p, (xb[None],))[0] * wb).sum())(prm)

        gs = torch.func.vmap(one)(x, w)
        return torch.cat([gs[n].reshape(4, -1) for n in params], 1)

    ref = torch.func.grad(lambda prm: per_sample(prm).pow(2).sum())(params)
    got = torch.autograd.grad(g.pow(2).sum(), list(params.values()), allow_unused=True)
    for (n, r), gr in zip(ref.items(), got):
        gr = torch.zeros_like(r) if gr is None else gr  # the last bias's per-sample gradient is w itself
        assert_close(gr, r, f"gradient of the per-sample gradients' squared norm w.r.t. {n}")


def test_huge_page_advice_leaves_the_tensor_as_it_is():
    from fxjac.rules._rt import advise_huge_pages

    t = torch.empty(1 << 24)  # 64 MiB: large enough to be advised
    assert advise_huge_pages(t) is t
    t.fill_(2.0)
    assert t.sum().item() == 2.0 * (1 << 24)
    small = torch.ones(3)
    assert advise_huge_pages(small) is small and small.sum().item() == 3


def test_differentiable_vjp_through_fused_kernels():
    """``differentiable=True`` through the rules' fused ATen kernels (convolution, group/batch/layer norm, max
    pooling, interpolate, activations): second derivatives match torch.func's (group norm's fused backward has
    no double backward in ATen, so the rule must not use it then).
    """
    from torch.func import functional_call, grad
    from torch.func import vjp as func_vjp

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.gn = nn.Conv2d(3, 8, 3, padding=1), nn.GroupNorm(2, 8)
            self.c2, self.bn = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8).eval()
            self.ln, self.fc = nn.LayerNorm(8), nn.Linear(32, 4)

        def forward(self, x):
            h = F.max_pool2d(torch.relu(self.gn(self.c1(x))), 2)
            h = F.interpolate(F.gelu(self.bn(self.c2(h))), scale_factor=2, mode="bilinear")
            h = self.ln(F.avg_pool2d(h, 4).permute(0, 2, 3, 1)).flatten(1)
            return self.fc(torch.tanh(h))

    torch.manual_seed(0)
    model = Net().double()
    model.bn.running_mean.uniform_(-1, 1)
    model.bn.running_var.uniform_(0.5, 2)
    x = torch.randn(3, 3, 8, 8, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 4, dtype=torch.float64)
    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = dict(model.named_buffers())
    for wrt in ("input", "params"):
        _, g = fxjac.vjp(model, wrt=wrt, differentiable=True)(x, w)
        (got,) = torch.autograd.grad((g ** 2).sum(), x)

        def f(xx, wrt=wrt):
            if wrt == "input":
                _, pull = func_vjp(lambda u: functional_call(model, (params, buffers), (u,)), xx)
                return (pull(w)[0] ** 2).sum()
            _, pull = func_vjp(lambda p: functional_call(model, (p, buffers), (xx,)), params)
            return sum((v ** 2).sum() for v in pull(w)[0].values())

        ref = grad(f)(x.detach())
        assert (got - ref).abs().max() <= 1e-10 * ref.abs().max(), wrt


class _ManualLayerNorm(nn.Module):
    """``nn.LayerNorm``'s arithmetic in plain ops (the reference: ATen's fused kernel keeps its statistics out of
    autograd's double backward under torch.func)."""

    def __init__(self, ln):
        super().__init__()
        self.ln = ln

    def forward(self, x):
        mu = x.mean(-1, keepdim=True)
        var = ((x - mu) ** 2).mean(-1, keepdim=True)
        return (x - mu) / torch.sqrt(var + self.ln.eps) * self.ln.weight + self.ln.bias


@pytest.mark.parametrize("name", ["jtmjp", "jmp", "ggn"])
def test_differentiable_products_with_several_columns(name):
    """``differentiable=True`` where a stack of columns goes through layer norm (whose saved statistics are
    constants to autograd: computed again from the input then) and SiLU, Mish and Hardsigmoid (whose ATen kernels
    have no derivative: their derivatives instead): d/dx of the result matches torch.func's.
    """
    from torch.func import jacrev

    torch.manual_seed(0)
    ln = nn.LayerNorm(5)
    with torch.no_grad():
        ln.weight.normal_(1, 0.3)
        ln.bias.normal_(0, 0.3)
    # autograd has no second derivative of hardsigmoid (the torch.func reference): finite differences check it
    gate = nn.Hardsigmoid() if name == "ggn" else nn.Tanh()
    head = [nn.Linear(5, 5), nn.Mish(), nn.Linear(5, 4), gate, nn.Linear(4, 3)]
    model = nn.Sequential(nn.Linear(4, 5), ln, nn.SiLU(), *head).double().eval()
    reference = nn.Sequential(model[0], _ManualLayerNorm(ln), *model[2:]).eval()
    g = torch.Generator().manual_seed(1)
    x, m = randn(3, 4, g=g), randn(3, 4, 2, g=g)
    c = randn(3, 4, g=g) if name == "jtmjp" else randn(3, 3, 2, g=g)  # weights of the result's entries

    def jac(xx):
        J = jacrev(reference)(xx)  # [B, 3, B, 4]
        return torch.stack([J[b, :, b] for b in range(xx.shape[0])])

    if name == "jtmjp":
        product, ref = fxjac.jtmjp(model, out="diag", differentiable=True), lambda xx: (jac(xx) ** 2).sum(1)
    elif name == "jmp":
        product, ref = fxjac.jmp(model, differentiable=True), lambda xx: torch.einsum("boi,bik->bok", jac(xx), m)
    else:
        product = fxjac.ggn(model, loss="cross_entropy", out="diag", differentiable=True)
        n_params = sum(q.numel() for q in model.parameters())
    xx = x.clone().requires_grad_()
    got = product(xx, m)[1] if name == "jmp" else product(xx)[1]
    if name == "ggn":  # d/dx of the GGN diagonal against finite differences of fxjac's (checked) values
        w = randn(n_params, g=g)
        (gx,) = torch.autograd.grad((got * w).sum(), xx)
        h, fd = 1e-6, torch.zeros_like(x)
        with torch.no_grad():
            for i in range(x.numel()):
                step = torch.zeros(x.numel(), dtype=x.dtype)
                step[i] = h
                step = step.reshape(x.shape)
                fd.view(-1)[i] = ((product(x + step)[1] - product(x - step)[1]) * w).sum() / (2 * h)
        assert_close(gx, fd, "d/dx of a differentiable GGN diagonal", rtol=1e-6)
        return
    (gx,) = torch.autograd.grad((got * c).sum(), xx)
    xr = x.clone().requires_grad_()
    (rx,) = torch.autograd.grad((ref(xr) * c).sum(), xr)
    assert_close(got.detach(), ref(x).detach(), f"{name} values")
    assert_close(gx, rx, f"d/dx of a differentiable {name}")


@pytest.mark.parametrize("twin", [False, True])
def test_clean_up_keeps_writes_into_arguments_only_for_their_one_reader(twin):
    """A node that writes into its argument (``meta["writes_arg"]``) keeps doing so only where it is that value's
    one reader in the finished graph; where CSE merges the argument with a twin that others read, it gets back its
    plain form (``meta["plain"]``).
    """
    import torch.fx as fx

    from passes.clean import clean

    def scale_into(tag, t, k):
        return t.mul_(k)

    g = fx.Graph()
    x = g.placeholder("x")
    a = g.call_function(torch.neg, (x,))
    b = g.call_function(torch.neg, (x if twin else a,))  # a twin of ``a``, or a value of its own
    w = g.call_function(scale_into, ("mul", b, 2.0))
    w.meta.update(writes_arg=1, plain=torch.mul, plain_drop=1)
    g.output((a, w))
    gm = clean(fx.GraphModule(torch.nn.Module(), g))
    (writer,) = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is not torch.neg]
    assert writer.target is (torch.mul if twin else scale_into)
    x = torch.randn(3)
    y, z = gm(x)
    assert torch.equal(y, -x) and torch.equal(z, (-x if twin else x) * 2)


# --- the contract's edges (found by a probe of API.md, eighth session) ----------------------------------------


def test_block_metric_is_checked():
    """``matrix="block"``: one symmetric ``[P_m, P_m]`` per module, the model's dtype, else ShapeError."""
    model = mlp()
    x = randn(4, 3)
    p = fxjac.jmjtp(model, wrt="params", matrix="block", example_inputs=(x,))
    good = [torch.eye(20, dtype=torch.float64), torch.eye(12, dtype=torch.float64)]
    _, r = p(x, good)
    J = per_sample_jacobian(model, (x,), "params")
    assert_close(r, torch.einsum("bop,bqp->boq", J, J), "identity blocks")
    asym = torch.randn(12, 12, dtype=torch.float64)
    for bad, words in ((good[:1], "list of 2 blocks"), (good + good[:1], "list of 2 blocks"),
                       ([good[0], torch.eye(11, dtype=torch.float64)], r"M\[1\] has shape"),
                       ([good[0], asym], r"M\[1\] must be symmetric"), ([good[0], good[1].float()], "dtype"),
                       (torch.eye(32, dtype=torch.float64), "got a Tensor")):
        with pytest.raises(fxjac.ShapeError, match=words):
            p(x, bad)


@pytest.mark.compile
def test_full_metric_compiles_with_its_symmetry_check():
    """A full ``M``'s symmetry check reads values: under torch.compile an assertion in the graph, not a break."""
    model = mlp()
    x = randn(4, 3)
    p = fxjac.jmjtp(model, wrt="params", matrix="full", example_inputs=(x,))
    a = randn(32, 32)
    torch._dynamo.reset()
    compiled = torch.compile(p, backend="aot_eager", fullgraph=True, dynamic=True)
    for batch in (4, 6):
        xb = randn(batch, 3)
        assert_close(compiled(xb, a + a.T)[1], p(xb, a + a.T)[1], "compiled jmjtp, full M")
    via_fxjac = fxjac.compile(model, "jmjtp", wrt="params", matrix="full", backend="aot_eager",
                              example_inputs=(x,))
    via_fxjac(x, a + a.T)
    with pytest.raises(RuntimeError, match="M must be symmetric"):
        via_fxjac(x, a)


def test_training_mode_after_the_build_is_a_mode_error():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Dropout(0.2), nn.Linear(4, 2)).double().eval()
    p = fxjac.vjp(model)
    x, w = randn(5, 3), randn(5, 2)
    p(x, w)
    model[2].train()
    with pytest.raises(fxjac.ModeError, match=r"'2' \(Dropout\) is in training mode"):
        p(x, w)
    model.eval()
    model[1].train()
    with pytest.raises(fxjac.ModeError, match="BatchNorm1d"):
        p(x, w)
    model.eval()
    p(x, w)
    zero = nn.Sequential(nn.Linear(3, 2), nn.Dropout(0.0)).double().eval()  # p = 0: the same in either mode
    q = fxjac.vjp(zero)
    q(x, w)
    zero.train()
    q(x, w)


class _FunctionalDropout(nn.Module):
    """HuggingFace's pattern: dropout as a function of the module's mode."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 2)

    def forward(self, x):
        return F.dropout(self.fc(x), p=0.5, training=self.training)


class _DropoutInAHelper(nn.Module):
    """The mode read by a helper method that forward calls, not by forward itself."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 2)

    def _regularise(self, h):
        return F.dropout(h, p=0.5, training=self.training)

    def forward(self, x):
        return self._regularise(self.fc(x))


class _SelfAttention(nn.Module):
    def __init__(self, dropout):
        super().__init__()
        self.att = nn.MultiheadAttention(4, 2, dropout=dropout, batch_first=True)

    def forward(self, x):
        return self.att(x, x, x, need_weights=False)[0]


def test_training_mode_read_by_forward_or_attention_dropout_is_a_mode_error_after_the_build():
    # probe TT: both kept computing the eval forward after model.train(), silently
    x, w = randn(5, 3), randn(5, 2)
    cases = ((_FunctionalDropout(), "root module (_FunctionalDropout)"),
             (nn.Sequential(nn.Linear(3, 3), _FunctionalDropout()), "submodule '1' (_FunctionalDropout)"),
             (_DropoutInAHelper(), "root module (_DropoutInAHelper)"))  # (read by a helper: found in the 17th)
    for model, where in cases:
        model = model.double().eval()
        p = fxjac.vjp(model)
        p(x, w)
        model.train()
        with pytest.raises(fxjac.ModeError, match=re.escape(where) + " is in training mode"):
            p(x, w)
    att = _SelfAttention(0.3).double().eval()
    q = fxjac.vjp(att)
    q(randn(2, 3, 4), randn(2, 3, 4))
    att.train()
    with pytest.raises(fxjac.ModeError, match=r"'att' \(MultiheadAttention\) is in training mode"):
        q(randn(2, 3, 4), randn(2, 3, 4))
    plain = _SelfAttention(0.0).double().eval()  # no dropout: the same in either mode
    r = fxjac.vjp(plain)
    r(randn(2, 3, 4), randn(2, 3, 4))
    plain.train()
    _, got = r(randn(2, 3, 4), randn(2, 3, 4))
    ref = torch.func.vjp(plain, randn(2, 3, 4))[1](randn(2, 3, 4))[0]
    assert_close(got, ref, "attention without dropout after model.train()")


def test_a_recurrent_layers_dropout_in_training_mode_is_a_mode_error():
    # A GRU kept whole (a leaf) with dropout between its layers: the error blamed samples depending on each other.
    model = nn.Sequential(nn.GRU(3, 4, num_layers=2, dropout=0.5, batch_first=True)).double()
    x = randn(2, 5, 3)
    with pytest.raises(fxjac.ModeError, match="(?s)active Dropout.*leaf module GRU"):
        fxjac.jvp(model, output=0)
    p = fxjac.jvp(model.eval(), output=0)
    ref = torch.func.jvp(lambda u: model(u)[0], (x,), (x,))[1]
    assert_close(p(x, x)[1], ref, "jvp through the GRU in eval mode")
    model.train()
    with pytest.raises(fxjac.ModeError, match=r"'0' \(GRU\) is in training mode"):
        p(x, x)


class _DictInput(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 2)

    def forward(self, batch):
        return self.fc(batch["x"]) * batch["z"]


class _CountFirst(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 2)

    def forward(self, n, x):
        return self.fc(x) * n


def test_per_sample_products_take_the_batch_size_from_a_tensor_input():
    # The batch size was read from the first input: a raw AttributeError for a number or a dict there (probe GG).
    torch.manual_seed(0)
    x, z, w = randn(4, 3), torch.rand(4, 2, dtype=torch.float64), randn(4, 2)
    model = _CountFirst().double()
    _, got = fxjac.vjp(model, wrt="params", reduce="none", example_inputs=(3, x))(3, x, w)
    ref = torch.cat([3 * torch.einsum("bo,bi->boi", w, x).flatten(1), 3 * w], 1)  # d(3 (W x + b)) / d(W, b)
    assert_close(got, ref, "per-sample vjp")
    model = _DictInput().double()
    batch = {"x": x, "z": z}
    _, got = fxjac.vjp(model, wrt="params")(batch, w)
    ref = torch.func.vjp(lambda *p: torch.func.functional_call(model, dict(zip(("fc.weight", "fc.bias"), p)),
                                                               (batch,)), model.fc.weight, model.fc.bias)[1](w)
    assert_close(got, torch.cat([r.reshape(-1) for r in ref]), "summed vjp with a dict input")
    with pytest.raises(fxjac.UnsupportedOpError, match="containers"):
        fxjac.vjp(model, wrt="params", reduce="none")(batch, w)


class _KeywordOnly(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 2)

    def forward(self, x, *, z):
        return self.fc(x) * z


class _Variadic(nn.Module):
    """HuggingFace's style: optional inputs in ``**kwargs``, read with ``.get``."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 2)

    def forward(self, x, *args, **kwargs):
        h = self.fc(x)
        return h if kwargs.get("mask") is None else h * kwargs["mask"]


class _ReadsArgs(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 2)

    def forward(self, *inputs):
        return self.fc(inputs[0]) * inputs[1]


@pytest.mark.parametrize("lazy", [True, False], ids=["built at the first call", "example_inputs"])
def test_keyword_only_and_variadic_forward_parameters(lazy):
    # A keyword-only input failed in the first call's check (the model called positionally); *args and **kwargs
    # were product inputs (a missing operand, a wrong input count), and kwargs.get('mask') was a traced value,
    # never None (probe GG). A product passes no keyword arguments: kwargs is {} and args () while tracing.
    torch.manual_seed(0)
    x, z, w = randn(4, 3), torch.rand(4, 2, dtype=torch.float64), randn(4, 2)
    for model, inputs in ((_KeywordOnly().double(), (x, z)), (_Variadic().double(), (x,))):
        y, got = fxjac.vjp(model, wrt="params", example_inputs=None if lazy else inputs)(*inputs, w)
        scale = z if isinstance(model, _KeywordOnly) else 1.0
        assert_close(y, model.fc(x) * scale, "primal")
        assert_close(got, torch.cat([(w * scale).T.mm(x).flatten(), (w * scale).sum(0)]), "vjp w.r.t. parameters")
    reads = _ReadsArgs().double()
    if lazy:  # how many inputs *inputs takes is not known before the first call: example_inputs= tells
        with pytest.raises(fxjac.TraceError, match=r"takes \*inputs, which is empty while tracing(.|\n)*"
                                                   "example_inputs=.*beyond the named ones"):
            fxjac.vjp(reads)
        return
    p = fxjac.vjp(reads, wrt="input:1", example_inputs=(x, z))  # probe HH: *args read, now traced
    assert "def forward(self, inputs_0, inputs_1, w)" in p.code
    y, got = p(x, z, w)
    assert_close(y, reads(x, z), "primal with *inputs")
    assert_close(got, w * reads.fc(x), "vjp w.r.t. the second of *inputs")


def test_float_ids_for_a_product_built_on_integer_ids_are_a_shape_error():
    # A raw RuntimeError from inside the embedding before (probe GG); any integer dtype is accepted.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(10, 4), nn.Flatten(), nn.Linear(12, 2)).double()
    ids, w = torch.randint(0, 10, (3, 3)), randn(3, 2)
    p = fxjac.vjp(model, wrt="params")
    assert_close(p(ids.int(), w)[1], p(ids, w)[1], "int32 ids")
    with pytest.raises(fxjac.ShapeError, match="built for integer inputs"):
        p(ids.double(), w)


def test_concrete_args_other_than_the_defaults():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 2)

        def forward(self, x, double=False):
            return self.fc(x) * (2.0 if double else 1.0)

    model = Twice().double()
    x, v = randn(4, 3), randn(4, 3)
    y, t = fxjac.jvp(model, concrete_args={"double": True})(x, v)
    y_ref, t_ref = torch.func.jvp(lambda u: model(u, True), (x,), (v,))
    assert_close(y, y_ref, "primal with double=True")
    assert_close(t, t_ref, "jvp with double=True")


class _Options(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 2)

    def forward(self, x, scale=2.0, mask=None, mode="plain"):
        h = self.fc(x) * scale
        if mode == "tanh":
            h = torch.tanh(h)
        return h if mask is None else h * mask


@pytest.mark.parametrize("given, inputs", [({"scale": 3.0}, 1), ({"mode": "tanh"}, 1), ({"scale": 3.0}, 2)],
                         ids=["a number", "a string", "a number before a tensor input"])
@pytest.mark.parametrize("lazy", [True, False], ids=["built at the first call", "example_inputs"])
def test_concrete_args_leave_the_other_defaults_traced_as_defaults(given, inputs, lazy):
    # concrete_args= for one argument made every other defaulted argument a graph input: the operand w went into
    # mask, and a string flag was a TraceError.
    torch.manual_seed(0)
    model = _Options().double()
    xs = (randn(4, 3), torch.rand(4, 2, dtype=torch.float64))[:inputs]
    w = randn(4, 2)
    p = fxjac.vjp(model, wrt="params", concrete_args=given, example_inputs=None if lazy else xs)
    if lazy and inputs == 2:  # a defaulted argument is an input only when example_inputs= gives it
        with pytest.raises(TypeError, match="among example_inputs"):
            p(*xs, w)
        return
    y, got = p(*xs, w)
    names = ("x", "mask")[:inputs]

    def f(*params):
        return torch.func.functional_call(model, dict(zip(("fc.weight", "fc.bias"), params)), (),
                                          dict(zip(names, xs), **given))

    ref, pull = torch.func.vjp(f, model.fc.weight.detach(), model.fc.bias.detach())
    assert_close(y, ref, "primal")
    assert_close(got, torch.cat([g.reshape(-1) for g in pull(w)]), "vjp w.r.t. the parameters")


def test_a_missing_operand_is_named():
    # probe AM: Python's bare "forward() missing 1 required positional argument: 'M'"
    for p in (fxjac.jtmjp(mlp(), matrix="diag"), fxjac.jtmjp(mlp(), matrix="diag", example_inputs=(randn(4, 3),))):
        with pytest.raises(TypeError, match=r"takes 2 positional argument\(s\) \(.*, M\), got 1: M missing"):
            p(randn(4, 3))
    y, got = fxjac.jtmjp(mlp(), matrix="diag")(randn(4, 3), M=torch.ones(4, 2, dtype=torch.float64))
    assert got.shape == (4, 3, 3)


@pytest.mark.parametrize("output", [0, -1, 5, "logits"])
def test_output_on_a_tensor_output_is_refused(output):
    # probe AM: -1 picked the last sample (a ModeError about samples depending on each other), 5 and "logits" failed
    # in the traced model (TraceErrors)
    with pytest.raises(fxjac.OptionError, match="returns one tensor"):
        fxjac.jvp(mlp(), output=output, example_inputs=(randn(4, 3),))
    with pytest.raises(fxjac.OptionError, match="returns one tensor"):
        fxjac.jacobian(mlp(), output=output)(randn(4, 3))


def test_output_selects_a_tuple_element_that_is_an_index_expression():
    """A tuple element that is itself an indexing (an LSTM's c_n[-1], x[:, -1]) is selected by output=, not taken
    for output= indexing a single tensor (found by a probe: refused with 'returns one tensor')."""

    class Last(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 3)

        def forward(self, x):
            return self.fc(x[:, -1]), x[:, -1]

    model = Last().double()
    x, v = randn(3, 5, 4), randn(3, 5, 4, g=rng(1))
    for k in (0, 1):
        _, t = fxjac.jvp(model, output=k)(x, v)
        assert_close(t, torch.func.jvp(lambda u: model(u)[k], (x,), (v,))[1], f"jvp of output {k}")


def test_ggn_target_is_keyword_only():
    model = mlp()
    x, t = randn(4, 3), torch.zeros(4, dtype=torch.long)
    p = fxjac.ggn(model)
    assert torch.equal(p(x)[1], p(x, target=t)[1])
    with pytest.raises(TypeError, match="keyword-only"):
        p(x, t)
    with pytest.raises(TypeError, match="keyword-only"):
        fxjac.ggn_vp(model)(x, randn(32), t)


def test_operand_and_output_shape_errors_at_build_or_call():
    model = mlp()
    x = randn(4, 3)
    with pytest.raises(fxjac.ShapeError, match=r"expected \(4, 32\)"):
        fxjac.jvp(model, wrt="params")(x, randn(5, 32))  # a [B, P] tangent for another batch
    with pytest.raises(fxjac.OptionError, match=r"\[B, 2, \.\.\.\]"):  # mean and log-variance on axis 1
        fxjac.ggn(nn.Sequential(model, nn.Linear(2, 3).double()), loss="gaussian_nll", example_inputs=(x,))
    fxjac.ggn(nn.Sequential(model, nn.Unflatten(1, (2, 1))), loss="gaussian_nll", example_inputs=(x,))


def test_a_parameter_of_another_shape_is_a_stale_product():
    model = mlp()
    x = randn(4, 3)
    p = fxjac.jvp(model, wrt="params")
    p(x, randn(32))
    model[0].weight = nn.Parameter(randn(6, 3))
    with pytest.raises(fxjac.StaleProductError, match=r"'0.weight' has shape \(6, 3\)"):
        p(x, randn(32))


def test_common_options_are_checked_when_built():
    model = mlp()
    for options, words in ((dict(leaf_modules=3), "leaf_modules"), (dict(strict="yes"), "strict"),
                           (dict(output=1.5), "output"), (dict(differentiable=1), "differentiable"),
                           (dict(concrete_args=[1]), "concrete_args")):
        with pytest.raises(fxjac.OptionError, match=words):
            fxjac.vjp(model, **options)
    p = fxjac.vjp(model, leaf_modules=nn.Tanh)  # one class alone is a list of one
    p(randn(4, 3), randn(4, 2))
    assert p.fallback_ops


def test_accumulate_refuses_results_with_a_batch_axis():
    model = mlp()
    v = randn(sum(q.numel() for q in model.parameters()))
    for p, operands in ((fxjac.ggn(model, reduce="none"), ()), (fxjac.jtmjp(model), ()),
                        (fxjac.jvp(model, wrt="params"), (v,)), (fxjac.mjp(model, wrt="params"), (randn(4, 2, 2),))):
        for sizes in ((4, 3), (4, 4)):  # batches of equal sizes too: their samples must not be added up
            batches = [randn(n, 3, g=rng(i)) for i, n in enumerate(sizes)]
            with pytest.raises(fxjac.OptionError, match="per sample, in input or output space, or per column"):
                fxjac.accumulate(p, batches, *operands)
    # a batch of P samples: a per-sample [B, P] result has the shape of a summed [P, P] one (found by a probe)
    small = nn.Linear(2, 1).double()
    batches = [randn(3, 2, g=rng(i)).double() for i in range(2)]
    for p, operands in ((fxjac.ggn(small, loss="mse", reduce="none"), ()),
                        (fxjac.vjp(small, wrt="params", reduce="none"), (randn(3, 1).double(),))):
        with pytest.raises(fxjac.OptionError, match="per sample"):
            fxjac.accumulate(p, batches, *operands)
    # a per-sample product that needs an operand, given none: accumulate's own error, not the call's TypeError
    with pytest.raises(fxjac.OptionError, match="per sample"):
        fxjac.accumulate(fxjac.vjp(small, wrt="params", reduce="none"), batches)
    summed = fxjac.accumulate(fxjac.compile(small, "ggn", loss="mse", backend="aot_eager"), batches)
    ref = sum(fxjac.ggn(small, loss="mse")(x)[1] for x in batches)
    assert torch.allclose(summed, ref, rtol=1e-12, atol=0)


def test_sigma_of_a_loss_without_one_is_refused():
    with pytest.raises(fxjac.OptionError, match="loss='mse' takes none"):
        fxjac.ggn(mlp(), loss="mse", sigma=2.0)
    with pytest.raises(fxjac.OptionError, match="takes none"):
        fxjac.ggn_vp(mlp(), loss="cross_entropy", sigma=torch.ones(2))
    fxjac.ggn(mlp(), loss="mse", sigma=1.0)  # the value it has anyway


def test_accumulate_names_a_dict_batch():
    with pytest.raises(fxjac.OptionError, match="got a dict with keys"):
        fxjac.accumulate(fxjac.ggn(mlp()), [{"x": randn(4, 3), "y": torch.zeros(4, dtype=torch.long)}])


def test_an_optional_input_passed_positionally_to_a_lazy_product_is_explained():
    class Masked(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 2)

        def forward(self, x, mask=None):
            return self.fc(x if mask is None else x * mask)

    model = Masked().double()
    x, mask = randn(4, 3), randn(4, 3, g=rng(1))
    with pytest.raises(TypeError, match=r"takes 2 positional argument\(s\) \(x, w\), got 3.*example_inputs"):
        fxjac.vjp(model)(x, mask, randn(4, 2, g=rng(2)))
    _, g = fxjac.vjp(model, example_inputs=(x, mask))(x, mask, randn(4, 2, g=rng(2)))
    assert_close(g, torch.func.vjp(lambda a: model(a, mask), x)[1](randn(4, 2, g=rng(2)))[0], "with the mask")


def test_an_operand_passed_to_an_identity_metric_product_is_explained():
    x = randn(4, 3)
    with pytest.raises(TypeError, match="matrix='identity' .*takes no M; to pass an M in output space, .*'sqrt'$"):
        fxjac.jtmjp(mlp())(x, randn(4, 2))
    with pytest.raises(TypeError, match="in parameter space, build it with matrix='diag', 'full', 'sqrt' or 'block'"):
        fxjac.jmjtp(mlp(), wrt="params")(x, randn(32))
    with pytest.raises(TypeError, match="to pass an M in input space"):
        fxjac.jmjtp(mlp(), example_inputs=(x,))(x, randn(4, 3))


def test_a_lazy_products_code_does_not_name_operands_it_will_not_take():
    p = fxjac.vjp(mlp())
    assert "def forward(self, input_1, *operands)" in p.code  # the operand's name is the built product's
    w = randn(4, 2, g=rng(1))
    _, got = p(randn(4, 3), w=w)
    assert "def forward(self, input_1, w)" in p.code
    assert_close(got, torch.func.vjp(mlp(), randn(4, 3))[1](w)[0], "w passed by name at the first call")


def test_wrt_naming_a_buffer_or_a_module_prefix_is_explained():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(3, 4), nn.Linear(4, 2)
            self.register_buffer("scale", torch.ones(2))

        def forward(self, x):
            return self.fc2(self.fc1(x)) * self.scale

    with pytest.raises(fxjac.OptionError, match="'scale', which holds buffers, not parameters"):
        fxjac.vjp(Net(), wrt=["scale"])
    with pytest.raises(fxjac.OptionError, match="nearest names: \\['fc2', 'fc1'"):  # module prefixes are names too
        fxjac.vjp(Net(), wrt=["fc3"])


def test_a_container_whose_contents_fail_to_trace_is_not_told_to_wrap_itself():
    # "the model is a Sequential, which fxjac keeps whole…: Wrap it: nn.Sequential(model)" (probe TT's slip)
    model = nn.Sequential(nn.MultiheadAttention(4, 2, batch_first=True))  # called with one argument
    with pytest.raises(fxjac.TraceError) as info:
        fxjac.vjp(model, example_inputs=(randn(2, 3, 4),))
    assert "missing 2 required positional arguments" in str(info.value) and "Wrap it" not in str(info.value)


class _IgnoresItsMask(nn.Module):
    def __init__(self, use=False):
        super().__init__()
        self.fc, self.use = nn.Linear(3, 2), use

    def forward(self, x, attention_mask=None):
        return self.fc(x if not self.use else x * attention_mask[:, :])


def test_an_optional_input_given_but_unused_is_an_input():
    # probe WW: "the model takes 1 tensor input(s), got 2" (torch.fx's placeholder with a default was dropped)
    model = _IgnoresItsMask().double()
    x, mask, w = randn(4, 3), randn(4, 3, g=rng(1)), randn(4, 2, g=rng(2))
    p = fxjac.vjp(model, example_inputs=(x, mask))
    assert "def forward(self, x, attention_mask, w)" in p.code
    assert_close(p(x, mask, w)[1], w @ model.fc.weight, "vjp with the unused mask given")
    with pytest.raises(fxjac.TraceError, match=r"\['attention_mask'\] were traced as their defaults.*example_inputs"):
        fxjac.vjp(_IgnoresItsMask(use=True))  # a lazy product: the default None, subscripted


def test_compile_passes_the_products_own_mode_and_checks_torch_compiles_options_when_built():
    # probe UU: mode='reverse' went to torch.compile (dropped, or a raw RuntimeError at the first call); an unknown
    # backend failed at the first call
    model, x = mlp(), randn(4, 3)
    with pytest.raises(fxjac.OptionError, match="mode='reverse'"):  # the product's own refusal of chunk_size
        fxjac.compile(model, "jmjtp", mode="reverse", chunk_size=2, backend="eager")
    c = fxjac.compile(model, "jacobian", mode="forward", backend="eager")
    assert c.product._fxjac_spec is not None and c.mode is None
    assert_close(c(x)[1], torch.stack([torch.func.jacrev(model)(x[b]) for b in range(4)]), "compiled jacobian")
    with pytest.raises(fxjac.OptionError, match="backend='nosuch' is not a torch.compile backend.*'eager'"):
        fxjac.compile(model, "vjp", backend="nosuch")
    with pytest.raises(fxjac.OptionError, match="mode='fastest' is not a torch.compile mode"):
        fxjac.compile(model, "vjp", backend="inductor", mode="fastest")
    p = fxjac.compile(model, "vjp", wrt="params", backend="eager", example_inputs=(x,))
    assert list(fxjac.unflatten(p, torch.zeros(32))) == ["0.weight", "0.bias", "2.weight", "2.bias"]


def test_options_that_name_nothing_are_refused_when_built():
    # probe UU: concrete_args naming no parameter failed at the first call (a raw TypeError); a lazy module's
    # parameters were a TraceError quoting load_state_dict for wrt='input'; output= did not list the choices
    with pytest.raises(fxjac.OptionError, match=r"concrete_args names \['zzz'\].*parameters: \['input'\]"):
        fxjac.vjp(mlp(), concrete_args={"zzz": 1})
    with pytest.raises(fxjac.OptionError, match="not initialised yet .*run the model once"):
        fxjac.vjp(nn.Sequential(nn.LazyLinear(3)), example_inputs=(randn(4, 3),))

    class TopK(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 5)

        def forward(self, x):
            return torch.topk(self.fc(x), 2, dim=1)

    with pytest.raises(fxjac.OptionError, match=r"a topk with fields \['values', 'indices'\]"):
        fxjac.jacobian(TopK().double())(randn(4, 3))


def test_meta_inputs_are_a_shape_error_and_y_is_detached_when_it_is_a_view_of_the_input():
    # probe YY: a raw RuntimeError from the autocast check, or NotImplementedError from the batch check; y kept
    # the input's autograd history when the model returned a view of it
    model, x = mlp(), randn(4, 3)
    p = fxjac.jvp(model)
    p(x, x)
    meta = x.to("meta")
    with pytest.raises(fxjac.ShapeError, match="meta device"):
        p(meta, meta)
    with pytest.raises(fxjac.ShapeError, match="meta device"):
        fxjac.jvp(mlp().to("meta"), example_inputs=(meta,))

    class Every2nd(nn.Module):
        def forward(self, x):
            return x[:, ::2]

    xg = randn(4, 3).requires_grad_()
    v = randn(4, 3, g=rng(1))
    y, t = fxjac.jvp(Every2nd())(xg, v)
    assert not y.requires_grad and not t.requires_grad
    assert_close(t, v[:, ::2], "jvp of a slice")


def test_inputs_of_different_batches_are_a_shape_error_at_a_lazy_build():
    # Probe AC: the first call of a lazy product with a [3, ...] and a [2, ...] input built anyway (gather accepts
    # the smaller index) and its batch check blamed the model (ModeError); a built product says ShapeError.
    class Gather(nn.Module):
        def forward(self, x, idx):
            return x.gather(1, idx)

    x, idx = randn(3, 4), torch.tensor([[0, 2], [1, 1]])
    with pytest.raises(fxjac.ShapeError, match="input 1 has a batch of 2 and input 0 of 3"):
        fxjac.vjp(Gather())(x, idx, randn(3, 2))
    with pytest.raises(fxjac.ShapeError, match="input 1 has a batch of 2 and input 0 of 3"):
        fxjac.vjp(Gather(), example_inputs=(x, idx))
