"""Element-wise ops: activations, transcendental functions and the broadcasting arithmetic.

Each unary rule gives ``f'(x)`` (often from the primal output it reuses); an activation with an ATen backward
kernel also applies ``f'(x)·t`` to a whole stack in that one kernel (``fused``). Binary rules give one partial per
input. At kinks the derivative is autograd's choice: relu'(0) = 0, abs'(0) = 0, clamp passes at its bounds.
"""

from __future__ import annotations

import math
import operator

import torch
import torch.nn.functional as F

from passes.protocol import ZERO, Decline

from ..tracing import decomposes
from . import _rt
from .base import Broadcasting, Elementwise
from .registry import register

_aten = torch.ops.aten
# the activations' backward kernels may write into a cotangent no one else reads (Note [reused cotangents])
for _kernel in (_aten.threshold_backward, _aten.leaky_relu_backward, _aten.elu_backward, _aten.tanh_backward,
                _aten.sigmoid_backward, _aten.softplus_backward, _aten.hardtanh_backward, _aten.softshrink_backward,
                _aten.hardshrink_backward, _aten.log_sigmoid_backward):
    _rt.writes_into(_kernel)
# (mish_backward has no out form, hardswish_backward's is named ``out``: those two always allocate. silu's,
# hardsigmoid's and mish's kernels have no derivative of their own: see ``once_differentiable``)

SELU_ALPHA = 1.6732632423543772848170429916717
SELU_SCALE = 1.0507009873554804934193349852946
SIXTH = float(torch.tensor(1 / 6, dtype=torch.float32))
"""hardsigmoid's slope as ATen's backward kernel has it in every dtype (``1.0f / 6.0f``): autograd's derivative."""


def celu_input_scale(alpha):
    """1 / alpha as autograd's celu derivative has it: alpha rounded to float32 first (derivatives.yaml,
    ``1.0/alpha.toFloat()``), so the rule agrees with autograd to the last bit in float64 too.
    """
    return 1.0 / float(torch.tensor(alpha, dtype=torch.float32))


# --- derivative kernels (run inside generated code) -----------------------------------------------------


def leaky_relu_grad(x, slope):
    """leaky_relu'(x) = 1 where x > 0, else the slope."""
    return torch.where(x > 0, torch.ones_like(x), torch.full_like(x, slope))


def elu_grad(x, alpha):
    """elu'(x) = 1 where x > 0, else alpha·exp(x)."""
    return torch.where(x > 0, torch.ones_like(x), alpha * torch.exp(x))


def scaled_elu_grad(x, alpha, scale, input_scale):
    """The derivative of ATen's scaled elu (selu, celu): scale where x > 0, else
    alpha·scale·input_scale·exp(input_scale·x) (the exp branch at 0, as autograd).
    """
    return torch.where(x > 0, torch.full_like(x, scale), alpha * scale * input_scale * torch.exp(x * input_scale))


def mish_grad(x):
    """mish'(x) = tanh(sp) + x sigmoid(x) (1 - tanh(sp)²), sp = softplus(x)."""
    t = torch.tanh(F.softplus(x))
    return t + x * torch.sigmoid(x) * (1 - t * t)


def hardswish_grad(x):
    """hardswish'(x) = 0 for x <= -3, x/3 + 1/2 for -3 < x < 3, 1 for x >= 3 (autograd's choice at ±3)."""
    inner = torch.where(x < 3, x / 3 + 0.5, torch.ones_like(x))
    return torch.where(x <= -3, torch.zeros_like(x), inner)


def hardsigmoid_grad(x):
    """hardsigmoid'(x) = 1/6 for -3 < x < 3, else 0 (strict, as autograd)."""
    return ((x > -3) & (x < 3)).to(x.dtype) * SIXTH


def softsign_grad(x):
    """softsign'(x) = 1 / (1 + |x|)²."""
    return torch.reciprocal(torch.square(x.abs() + 1))


def threshold_grad(x, threshold):
    """threshold'(x) = [x > threshold] (0 at the threshold, as autograd)."""
    return (x > threshold).to(x.dtype)


def shrink_grad(x, lambd):
    """softshrink'(x) = hardshrink'(x) = [|x| > lambd] (0 at ±lambd, as autograd)."""
    return torch.logical_not((x >= -lambd) & (x <= lambd)).to(x.dtype)


def once_differentiable(kernel, derivative):
    """``kernel(t, x, **out)`` (ATen's ``f'(x)·t``, which autograd cannot differentiate) as a run-time kernel that
    computes ``derivative(x)·t`` instead where autograd records (a differentiable product).
    """

    def times(t, x, **out):
        if _rt.records_grad(t, x):
            return t * derivative(x)
        return kernel(t, x, **out)

    times.__name__ = times.__qualname__ = kernel.__name__.split('.')[0].replace("_backward", "_times")
    return times


def gelu_grad(x, approximate="none"):
    """gelu'(x): Φ(x) + x φ(x), or the derivative of the tanh approximation."""
    if approximate == "tanh":
        k = math.sqrt(2.0 / math.pi)
        u = k * (x + 0.044715 * x**3)
        t = torch.tanh(u)
        return 0.5 * (1 + t) + 0.5 * x * (1 - t * t) * k * (1 + 3 * 0.044715 * x * x)
    cdf = 0.5 * (1 + torch.erf(x / math.sqrt(2.0)))
    pdf = torch.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)
    return cdf + x * pdf


@_rt.writes_into
def gelu_times(t, x, approximate, **out):
    """``gelu'(x) · t`` by ATen's gelu backward (its oneDNN kernel wants ``x`` expanded to the stack's shape);
    ``out`` may name its ``grad_input``.
    """
    return _aten.gelu_backward(t, x.expand_as(t), approximate=approximate, **out)


def silu_grad(x):
    """silu'(x) = s (1 + x (1 - s)), s = sigmoid(x)."""
    s = torch.sigmoid(x)
    return s * (1 + x * (1 - s))


def softplus_grad(x, beta, threshold):
    """softplus'(x) = sigmoid(beta x), and 1 past the linear threshold."""
    return torch.where(x * beta > threshold, torch.ones_like(x), torch.sigmoid(beta * x))


def clamp_grad(x, lo, hi):
    """clamp'(x) = [lo <= x <= hi] (the gradient passes at the bounds, as in autograd)."""
    mask = torch.ones_like(x, dtype=torch.bool)
    if lo is not None:
        mask = mask & (x >= lo)
    if hi is not None:
        mask = mask & (x <= hi)
    return mask.to(x.dtype)


def clamp_min_grad(x, lo, hi):
    """∂clamp/∂min = [x < min < max] ([x < min] without max), as autograd (nothing gets one where x < min = max)."""
    mask = x < lo
    if hi is not None:
        mask = mask & (lo < hi)
    return mask.to(x.dtype)


def clamp_max_grad(x, lo, hi):
    """∂clamp/∂max = [x > max or max < min] ([x > max] without min): where the bounds cross the result is max."""
    mask = x > hi
    if lo is not None:
        mask = mask | (hi < lo)
    return mask.to(x.dtype)


def hardtanh_grad(x, lo, hi):
    """hardtanh'(x) = [lo < x < hi] (strict, as autograd's hardtanh_backward)."""
    return ((x > lo) & (x < hi)).to(x.dtype)


def pow_grad(x, exponent):
    """d(x^c)/dx = c x^(c-1), and exactly 0 where c = 0 (a tensor exponent too: 0 · 0^-1 would be NaN at x = 0),
    as autograd.
    """
    if isinstance(exponent, (int, float)):
        return torch.zeros_like(x) if exponent == 0 else exponent * torch.pow(x, exponent - 1)
    return torch.where(exponent == 0, 0.0, exponent * torch.pow(x, exponent - 1))


def pow_exponent_grad(x, y, exponent):
    """d(x^c)/dc = x^c log x, 0 where x = 0 and c >= 0 (autograd's choice: x^c log x -> 0 there; for c < 0 the
    derivative is -inf); ``x`` may be a number (``2 ** t``).
    """
    if not isinstance(x, torch.Tensor):
        if x == 0:
            return torch.where(exponent >= 0, 0.0, y * -math.inf)
        return y * math.log(x) if x > 0 else y * math.nan
    return torch.where((x == 0) & (exponent >= 0), 0.0, y * torch.log(x))


def _numbers(*args) -> bool:
    """Whether every argument is a plain Python number (not a value computed in the graph)."""
    return all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in args)


def mask_of(cond, dtype_like):
    """A boolean mask as 0/1 values of ``dtype_like``'s dtype."""
    return cond.to(dtype_like.dtype)


silu_times = _rt.writes_into(once_differentiable(_aten.silu_backward, silu_grad))
hardsigmoid_times = _rt.writes_into(once_differentiable(_aten.hardsigmoid_backward, hardsigmoid_grad))
mish_times = once_differentiable(_aten.mish_backward, mish_grad)


# --- unary element-wise ops ------------------------------------------------------------------------------


@register(torch.relu, F.relu, "relu")
class Relu(Elementwise):
    """y = max(x, 0); y' = [y > 0] = y'²: every product masks its stack by the primal output in one kernel."""

    def signature(input, inplace=False):  # noqa: D103
        ...

    def fused(self, e, site, t):  # noqa: D102
        return e(_aten.threshold_backward, t, site.out, 0)

    def diag_vjp(self, e, site, d):  # noqa: D102
        return {"input": self.fused(e, site, d)}


@register(F.leaky_relu)
class LeakyRelu(Elementwise):
    """y = x or slope·x; y' = 1 or slope."""

    def signature(input, negative_slope=0.01, inplace=False):  # noqa: D103
        ...

    def derivative(self, e, site):  # noqa: D102
        return e(leaky_relu_grad, site.args["input"], site.args["negative_slope"])

    def fused(self, e, site, t):  # noqa: D102
        slope = site.args["negative_slope"]
        return e(_aten.leaky_relu_backward, t, site.args["input"], slope, False) if _numbers(slope) else None


@register(F.rrelu, torch.rrelu)
class RRelu(LeakyRelu):
    """Randomised leaky ReLU in eval mode: leaky ReLU with the mean slope (lower + upper) / 2. Training mode draws
    a random slope per element and is refused (``tracing.check_modes``).
    """

    def signature(input, lower=1.0 / 8, upper=1.0 / 3, training=False, inplace=False, generator=None):  # noqa: D103
        ...  # F.rrelu's fifth argument is ``inplace``, torch.rrelu's ``generator``: both unused in eval mode

    @staticmethod
    def _slope(site):
        lo, hi = site.args["lower"], site.args["upper"]
        if not _numbers(lo, hi):
            raise Decline  # bounds computed in the graph
        return (lo + hi) / 2

    def derivative(self, e, site):  # noqa: D102
        return e(leaky_relu_grad, site.args["input"], self._slope(site))

    def fused(self, e, site, t):  # noqa: D102
        return e(_aten.leaky_relu_backward, t, site.args["input"], self._slope(site), False)


@decomposes(F.prelu)
def prelu(input, weight):
    """PReLU as ``where(x > 0, x, a·x)``, ``a`` (one slope, or one per channel) applied along dim 1.

    torch's own batching rule for prelu's backward is wrong under nested vmap (the autograd fallback's
    per-sample path), and the parts get structured rules: the slopes' per-sample cotangents are sums. The slopes
    scale ``where(x > 0, 0, x)``, as autograd selects before it multiplies: their derivative at ``x = inf`` is 0,
    not NaN (and a NaN ``x`` takes the slope, as in autograd).
    """
    negative = torch.where(input > 0, 0.0, input)
    scaled = (negative.transpose(1, -1) * weight).transpose(1, -1)
    return torch.where(input > 0, input, scaled)


@register(F.elu)
class Elu(Elementwise):
    """y = x or alpha (exp x - 1); y' = 1 or alpha exp x."""

    def signature(input, alpha=1.0, inplace=False):  # noqa: D103
        ...

    def derivative(self, e, site):  # noqa: D102
        return e(elu_grad, site.args["input"], site.args["alpha"])

    def fused(self, e, site, t):  # noqa: D102
        alpha = site.args["alpha"]
        return e(_aten.elu_backward, t, alpha, 1, 1, False, site.args["input"]) if _numbers(alpha) else None


@register(F.gelu)
class Gelu(Elementwise):
    """y = x Φ(x) (or its tanh approximation); y' = Φ(x) + x φ(x)."""

    def signature(input, approximate="none"):  # noqa: D103
        ...

    def derivative(self, e, site):  # noqa: D102
        return e(gelu_grad, site.args["input"], site.args["approximate"])

    def fused(self, e, site, t):  # noqa: D102
        approximate = site.args["approximate"]
        if not isinstance(approximate, str):
            return None
        return e(gelu_times, t, site.args["input"], approximate)


class _Activation(Elementwise):
    """``y = f(x)``: ``grad`` computes ``f'(x)``, ``times`` applies ``f'(x)·t`` to a stack as one kernel
    (``times(t, x)``: ATen's backward, or its once-differentiable wrapper).
    """

    grad = times = None

    def signature(input, inplace=False):  # noqa: D103
        ...

    def derivative(self, e, site):  # noqa: D102
        return e(self.grad, site.args["input"])

    def fused(self, e, site, t):  # noqa: D102
        return e(self.times, t, site.args["input"])


@register(F.silu)
class Silu(_Activation):
    """y = x sigmoid(x); y' = s (1 + x (1 - s))."""

    grad, times = staticmethod(silu_grad), staticmethod(silu_times)


@register(torch.tanh, "tanh")  # F.tanh and F.sigmoid call the methods
class Tanh(Elementwise):
    """y = tanh(x); y' = 1 - y², reusing the primal output."""

    def derivative(self, e, site):  # noqa: D102
        y = site.out
        return e(operator.sub, 1.0, e(operator.mul, y, y))

    def fused(self, e, site, t):  # noqa: D102
        return e(_aten.tanh_backward, t, site.out)


@register(torch.sigmoid, "sigmoid")
class Sigmoid(Elementwise):
    """y = sigmoid(x); y' = y (1 - y), reusing the primal output."""

    def derivative(self, e, site):  # noqa: D102
        y = site.out
        return e(operator.mul, y, e(operator.sub, 1.0, y))

    def fused(self, e, site, t):  # noqa: D102
        return e(_aten.sigmoid_backward, t, site.out)


@register(F.softplus)
class Softplus(Elementwise):
    """y = log(1 + exp(beta x)) / beta; y' = sigmoid(beta x) (1 past the threshold)."""

    def signature(input, beta=1.0, threshold=20.0):  # noqa: D103
        ...

    def derivative(self, e, site):  # noqa: D102
        return e(softplus_grad, site.args["input"], site.args["beta"], site.args["threshold"])

    def fused(self, e, site, t):  # noqa: D102
        beta, threshold = site.args["beta"], site.args["threshold"]
        if not _numbers(beta, threshold):
            return None
        return e(_aten.softplus_backward, t, site.args["input"], beta, threshold)


@register(F.selu, torch.selu)
class Selu(Elementwise):
    """y = scale·elu(x, alpha) with SELU's constants; y' = scale or scale·alpha·exp x (the exp branch at 0)."""

    def signature(input, inplace=False):  # noqa: D103
        ...

    def derivative(self, e, site):  # noqa: D102
        return e(scaled_elu_grad, site.args["input"], SELU_ALPHA, SELU_SCALE, 1.0)

    def fused(self, e, site, t):  # noqa: D102
        return e(_aten.elu_backward, t, SELU_ALPHA, SELU_SCALE, 1, False, site.args["input"])


@register(F.celu, torch.celu)
class Celu(Elementwise):
    """y = x or alpha (exp(x / alpha) - 1); y' = 1 or exp(x / alpha)."""

    def signature(input, alpha=1.0, inplace=False):  # noqa: D103
        ...

    @staticmethod
    def _alpha(site):
        alpha = site.args["alpha"]
        if not _numbers(alpha):
            raise Decline  # alpha computed in the graph
        return alpha

    def derivative(self, e, site):  # noqa: D102
        alpha = self._alpha(site)
        return e(scaled_elu_grad, site.args["input"], alpha, 1.0, celu_input_scale(alpha))

    def fused(self, e, site, t):  # noqa: D102
        alpha = self._alpha(site)
        return e(_aten.elu_backward, t, alpha, 1, celu_input_scale(alpha), False, site.args["input"])


@register(F.mish)
class Mish(_Activation):
    """y = x tanh(softplus(x)); y' = tanh(sp) + x sigmoid(x) (1 - tanh(sp)²)."""

    grad, times = staticmethod(mish_grad), staticmethod(mish_times)


@register(F.hardswish)
class Hardswish(_Activation):
    """y = x relu6(x + 3) / 6; y' = 0, x/3 + 1/2 or 1 (0 at -3 and 1 at 3, as autograd)."""

    grad, times = staticmethod(hardswish_grad), _aten.hardswish_backward


@register(F.hardsigmoid)
class Hardsigmoid(_Activation):
    """y = relu6(x + 3) / 6; y' = [-3 < x < 3] / 6 (strict, as autograd)."""

    grad, times = staticmethod(hardsigmoid_grad), staticmethod(hardsigmoid_times)


@register(F.logsigmoid)  # torch._C._nn.log_sigmoid
class LogSigmoid(Elementwise):
    """y = log sigmoid(x); y' = sigmoid(-x). The primal is ATen's forward, whose buffer the fused kernel reads."""

    def primal(self, e, site):  # noqa: D102
        both = e(_aten.log_sigmoid_forward, site.args["input"])
        return e(operator.getitem, both, 0), {"buffer": e(operator.getitem, both, 1)}

    def derivative(self, e, site):  # noqa: D102
        return e(torch.sigmoid, e(operator.neg, site.args["input"]))

    def fused(self, e, site, t):  # noqa: D102
        buffer = site.extra.get("saved", {}).get("buffer")
        return None if buffer is None else e(_aten.log_sigmoid_backward, t, site.args["input"], buffer)


@register(F.softsign)
class Softsign(Elementwise):
    """y = x / (1 + |x|); y' = 1 / (1 + |x|)²."""

    def derivative(self, e, site):  # noqa: D102
        return e(softsign_grad, site.args["input"])


@register(F.tanhshrink)
class Tanhshrink(Elementwise):
    """y = x - tanh(x); y' = tanh(x)²."""

    def derivative(self, e, site):  # noqa: D102
        return e(torch.square, e(torch.tanh, site.args["input"]))


class _Shrink(Elementwise):
    """softshrink/hardshrink: y' = [|x| > lambd] (0 at ±lambd, as autograd) = y'²."""

    kernel = None

    def signature(input, lambd=0.5):  # noqa: D103
        ...

    def derivative(self, e, site):  # noqa: D102
        return e(shrink_grad, site.args["input"], site.args["lambd"])

    def fused(self, e, site, t):  # noqa: D102
        lambd = site.args["lambd"]
        return e(self.kernel, t, site.args["input"], lambd) if _numbers(lambd) else None

    def diag_vjp(self, e, site, d):  # noqa: D102
        return {"input": self._times_derivative(e, site, d)}


@register(F.softshrink)  # torch._C._nn.softshrink
class Softshrink(_Shrink):
    """y = x - lambd, 0 or x + lambd."""

    kernel = _aten.softshrink_backward


@register(torch.hardshrink, "hardshrink")  # F.hardshrink is torch.hardshrink
class Hardshrink(_Shrink):
    """y = x where |x| > lambd, else 0."""

    kernel = _aten.hardshrink_backward


@register(F.threshold, torch.threshold)  # F.threshold is F._threshold
class Threshold(Elementwise):
    """y = x where x > threshold, else value; y' = [x > threshold] (0 at the threshold, as autograd) = y'²."""

    def signature(input, threshold, value, inplace=False):  # noqa: D103
        ...

    def derivative(self, e, site):  # noqa: D102
        return e(threshold_grad, site.args["input"], site.args["threshold"])

    def fused(self, e, site, t):  # noqa: D102
        th = site.args["threshold"]
        return e(_aten.threshold_backward, t, site.args["input"], th) if _numbers(th) else None

    def diag_vjp(self, e, site, d):  # noqa: D102
        return {"input": self._times_derivative(e, site, d)}


@decomposes(F.glu)
def glu(input, dim=-1):
    """GLU as ``a · sigmoid(b)``, ``a`` and ``b`` the halves of ``input`` along ``dim``: autograd's glu backward is
    this product rule, and the halves' structured rules need no kernel of their own.
    """
    halves = input.chunk(2, dim)
    return halves[0] * torch.sigmoid(halves[1])


@register(torch.sin, "sin")
class Sin(Elementwise):
    """y = sin(x); y' = cos(x)."""

    def derivative(self, e, site):  # noqa: D102
        return e(torch.cos, site.args["input"])


@register(torch.cos, "cos")
class Cos(Elementwise):
    """y = cos(x); y' = -sin(x)."""

    def derivative(self, e, site):  # noqa: D102
        return e(operator.neg, e(torch.sin, site.args["input"]))


@register(torch.exp, "exp")
class Exp(Elementwise):
    """y = exp(x); y' = y, reusing the primal output."""

    def derivative(self, e, site):  # noqa: D102
        return site.out


@register(torch.log, "log")
class Log(Elementwise):
    """y = log(x); y' = 1 / x, applied as a division in both directions and squared (autograd's ``t / x``: with
    ``1 / x`` inf for a subnormal ``x``, a zero tangent became NaN), so no :meth:`derivative` is formed.
    """

    def fused(self, e, site, t):  # noqa: D102
        return e(torch.div, t, site.args["input"])

    def diag_vjp(self, e, site, d):  # noqa: D102
        x = site.args["input"]
        return {"input": e(torch.div, d, e(operator.mul, x, x))}


@register(torch.log1p, "log1p")
class Log1p(Elementwise):
    """y = log(1 + x); y' = 1 / (1 + x)."""

    def derivative(self, e, site):  # noqa: D102
        return e(torch.reciprocal, e(operator.add, site.args["input"], 1.0))


@register(torch.sqrt, "sqrt")
class Sqrt(Elementwise):
    """y = sqrt(x); y' = 1 / (2 y), reusing the primal output."""

    def derivative(self, e, site):  # noqa: D102
        return e(operator.truediv, 0.5, site.out)


@register(torch.rsqrt, "rsqrt")
class Rsqrt(Elementwise):
    """y = x^(-1/2); y' = -y³ / 2, reusing the primal output."""

    def derivative(self, e, site):  # noqa: D102
        y = site.out
        return e(operator.mul, e(operator.mul, e(operator.mul, y, y), y), -0.5)


@register(torch.reciprocal, "reciprocal")
class Reciprocal(Elementwise):
    """y = 1 / x; y' = -y², reusing the primal output."""

    def derivative(self, e, site):  # noqa: D102
        y = site.out
        return e(operator.neg, e(operator.mul, y, y))


@register(torch.square, "square")
class Square(Elementwise):
    """y = x²; y' = 2x."""

    def derivative(self, e, site):  # noqa: D102
        return e(operator.mul, site.args["input"], 2.0)


@register(torch.abs, "abs", operator.abs)
class Abs(Elementwise):
    """y = |x|; y' = sign(x) (0 at 0, as autograd)."""

    def derivative(self, e, site):  # noqa: D102
        return e(torch.sign, site.args["input"])


@register(torch.erf, "erf")
class Erf(Elementwise):
    """y = erf(x); y' = 2/sqrt(pi) exp(-x²)."""

    def derivative(self, e, site):  # noqa: D102
        x = site.args["input"]
        return e(operator.mul, e(torch.exp, e(operator.neg, e(operator.mul, x, x))), 2.0 / math.sqrt(math.pi))


@register(torch.clamp, torch.clip, "clamp", "clip")
class Clamp(Broadcasting):
    """y = clamp(x, min, max); partials [min <= x <= max], [x < min < max] and [x > max or max < min] (autograd's
    backward: x keeps the derivative at a bound it touches; numbers as bounds get none).
    """

    inputs = ("input", "min", "max")
    selects = True

    def signature(input, min=None, max=None):  # noqa: D103
        ...

    def partial(self, e, site, name):  # noqa: D102
        grad = {"input": clamp_grad, "min": clamp_min_grad, "max": clamp_max_grad}[name]
        return e(grad, site.args["input"], site.args["min"], site.args["max"])


@register(F.hardtanh)
class Hardtanh(Elementwise):
    """y = clamp(x, lo, hi) via hardtanh; y' = [lo < x < hi] (strict, as autograd)."""

    def signature(input, min_val=-1.0, max_val=1.0, inplace=False):  # noqa: D103
        ...

    def derivative(self, e, site):  # noqa: D102
        return e(hardtanh_grad, site.args["input"], site.args["min_val"], site.args["max_val"])

    def fused(self, e, site, t):  # noqa: D102
        lo, hi = site.args["min_val"], site.args["max_val"]
        return e(_aten.hardtanh_backward, t, site.args["input"], lo, hi) if _numbers(lo, hi) else None


@register(F.relu6)
class Relu6(Elementwise):
    """y = min(max(x, 0), 6), computed as hardtanh(x, 0, 6); y' = [0 < x < 6]."""

    def signature(input, inplace=False):  # noqa: D103
        ...

    def derivative(self, e, site):  # noqa: D102
        return e(hardtanh_grad, site.args["input"], 0.0, 6.0)

    def fused(self, e, site, t):  # noqa: D102
        return e(_aten.hardtanh_backward, t, site.args["input"], 0.0, 6.0)


@register(torch.neg, operator.neg, "neg")
class Neg(Elementwise):
    """y = -x; y' = -1."""

    def derivative(self, e, site):  # noqa: D102
        return -1.0

    def jvp(self, e, site, tangents):  # noqa: D102
        t = tangents["input"]
        return ZERO if t is ZERO else e(operator.neg, t)

    def vjp(self, e, site, ct):  # noqa: D102
        return {"input": e(operator.neg, ct)}

    def diag_vjp(self, e, site, d):  # noqa: D102
        return {"input": d}


# --- binary, broadcasting ops ----------------------------------------------------------------------------


@register(torch.add, operator.add, "add")
class Add(Broadcasting):
    """y = x + alpha·other; partials 1 and alpha."""

    def signature(input, other, *, alpha=1):  # noqa: D103
        ...

    def partial(self, e, site, name):  # noqa: D102
        return 1 if name == "input" else site.args["alpha"]


@register(torch.sub, operator.sub, "sub")
class Sub(Broadcasting):
    """y = x - alpha·other; partials 1 and -alpha."""

    def signature(input, other, *, alpha=1):  # noqa: D103
        ...

    def partial(self, e, site, name):  # noqa: D102
        return 1 if name == "input" else -site.args["alpha"]


@register(torch.rsub)
class Rsub(Broadcasting):
    """y = other - alpha·x; partials -alpha and 1."""

    def signature(input, other, alpha=1):  # noqa: D103
        ...

    def partial(self, e, site, name):  # noqa: D102
        return -site.args["alpha"] if name == "input" else 1


@register(torch.mul, operator.mul, "mul")
class Mul(Broadcasting):
    """y = x · other; partials other and x."""

    def signature(input, other):  # noqa: D103
        ...

    def partial(self, e, site, name):  # noqa: D102
        return site.args["other"] if name == "input" else site.args["input"]


@register(torch.div, operator.truediv, "div")
class Div(Broadcasting):
    """y = x / other; partials 1/other and -y/other (zero with a rounding mode)."""

    def signature(input, other, *, rounding_mode=None):  # noqa: D103
        ...

    def partial(self, e, site, name):  # noqa: D102
        if site.args["rounding_mode"] is not None:
            return ZERO
        other = site.args["other"]
        if name == "input":  # (applied as a division: :meth:`scale`)
            return e(operator.truediv, 1.0, other) if isinstance(other, torch.fx.Node) else 1
        return e(operator.neg, e(operator.truediv, site.out, other))

    def scale(self, e, site, name, t, p, square=False):
        """``t / other`` (``/ other²``), as autograd divides: a product with ``1/other`` was inf, and 0 · inf NaN,
        for a subnormal ``other``, and a Python ``0.0`` raised ZeroDivisionError. ``other`` may be a number
        computed in the graph (``k.size(-1) ** 0.5``).
        """
        if name != "input" or p is ZERO:
            return super().scale(e, site, name, t, p, square)
        other = site.args["other"]
        if square:
            other = e(operator.mul, other, other) if isinstance(other, torch.fx.Node) else other * other
        if isinstance(other, (int, float)) and other == 1:
            return t
        return e(operator.truediv, t, other)

    def tangent(self, e, site, name, t, p):
        """The divisor's tangent as torch's forward mode orders it, ``-(t·y) / other``: ``y / other`` overflows
        (and a zero tangent times it is NaN) where ``other²`` underflows.
        """
        if name != "other" or p is ZERO:
            return super().tangent(e, site, name, t, p)
        return e(operator.truediv, e(operator.neg, e(operator.mul, t, site.out)), site.args["other"])


@register(torch.pow, operator.pow, "pow")
class Pow(Broadcasting):
    """y = x^c; partials c x^(c-1) and y log x."""

    inputs = ("input", "exponent")

    def signature(input, exponent):  # noqa: D103
        ...

    def partial(self, e, site, name):  # noqa: D102
        x, c = site.args["input"], site.args["exponent"]
        if name == "input":
            return e(pow_grad, x, c)
        return e(pow_exponent_grad, x, site.out, c)


def zero_mask(x, like):
    """``[x == 0]`` as 0/1 values of ``like``'s dtype."""
    return (x == 0).to(like.dtype)


@register(torch.heaviside, "heaviside")
class Heaviside(Broadcasting):
    """y = 0, ``values`` or 1 as x < 0, = 0 or > 0: piecewise constant in x (a zero derivative, as ``sign``'s;
    ATen has none), and ``values`` where x = 0.
    """

    inputs = ("input", "values")
    selects = True

    def signature(input, values):  # noqa: D103
        ...

    def partial(self, e, site, name):  # noqa: D102
        return ZERO if name == "input" else e(zero_mask, site.args["input"], site.out)


@register(torch.where)
class Where(Broadcasting):
    """y = where(cond, input, other); partials [cond] and [not cond]; the condition is constant."""

    selects = True

    def signature(condition, input, other):  # noqa: D103
        ...

    def partial(self, e, site, name):  # noqa: D102
        cond = site.args["condition"]
        if name == "input":
            return e(mask_of, cond, site.out)
        return e(mask_of, e(torch.logical_not, cond), site.out)


@register(torch.lerp, "lerp")
class Lerp(Broadcasting):
    """y = lerp(input, end, weight) = input + weight (end - input); partials 1 - weight, weight and end - input (a
    number as weight gets none).
    """

    inputs = ("input", "end", "weight")

    def signature(input, end, weight):  # noqa: D103
        ...

    def partial(self, e, site, name):  # noqa: D102
        w = site.args["weight"]
        if name == "input":
            return 1.0 - w if isinstance(w, (int, float)) else e(operator.sub, 1.0, w)
        if name == "end":
            return w
        return e(operator.sub, site.args["end"], site.args["input"])
