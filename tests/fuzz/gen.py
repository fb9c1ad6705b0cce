"""A random-architecture generator: small ``nn.Module`` DAGs written as Python SOURCE, so a failure replays.

``generate(seed, n_ops)`` returns an :class:`Arch` whose ``source`` is a self-contained script defining
``class Net(nn.Module)`` and ``build() -> (model, (x,))`` (float64, eval mode, batch 2-3, widths 2-6). Every
random choice comes from ``random.Random(seed)``: the same ``(seed, n_ops, exclude)`` gives the same source
(hypothesis draws the integers; ``n_ops`` shrinks towards smaller models).

What the graphs contain (each a *feature*; ``exclude=`` switches features off, except the Linear layers and
additions that join branches):
    fan-out and fan-in (older values are read again; unread branches join the output through a Linear and an
    add), linear, tied (a Linear module called a second time), conv1d, conv_strided (stride, dilation, groups),
    act, elementwise, relu_inplace (``nn.ReLU(inplace=True)`` on a fresh tensor; later readers of the old name
    see the mutation), iadd (``h += y`` on a fresh tensor), layernorm, groupnorm, batchnorm, instancenorm (eval,
    randomised statistics), softmax, reduce (centring, norms, max), expand, flatten, unflatten, transpose,
    slice, pad, pool, unsqueeze, stack, glu (chunk / split: tuple outputs), add, mul (two branches), cat,
    einsum (bmm, ``@``), attention (matmul -> softmax -> matmul), mha (``nn.MultiheadAttention``), sdpa
    (``F.scaled_dot_product_attention``), param (a raw ``nn.Parameter``, possibly transformed on its own before
    meeting the batch), mask (comparisons, ``torch.where``, argmax: constants for differentiation), dead (a
    dead branch), unused (a module never called), frozen (``requires_grad=False``).

A value's per-sample shape is ``(d,)`` or ``(C, L)``; the batch stays at dim 0 throughout. Where a generated
op would be degenerate in a way that only hides bugs (a norm over 2 entries is a sign function, with a zero
derivative computed as rounding noise) the generator avoids it.

Replay: ``python tests/fuzz/gen.py SEED N_OPS [EXCLUDED,FEATURES] > net.py`` writes the source; then
``from net import build; model, (x,) = build()``.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

FEATURES = (
    "linear", "conv1d", "act", "relu_inplace", "iadd", "layernorm", "groupnorm", "batchnorm", "softmax",
    "flatten", "unflatten", "transpose", "slice", "pool", "attention", "add", "mul", "cat", "tied", "mask",
    "dead", "unused", "frozen", "param", "reduce", "elementwise", "stack", "unsqueeze", "expand", "glu", "pad",
    "conv_strided", "mha", "sdpa", "instancenorm", "einsum",
)

# Element-wise activations, as format strings of one value.
_ACTS = (
    "torch.tanh({})", "torch.sigmoid({})", "F.gelu({})", "F.silu({})", "F.softplus({})", "F.elu({})",
    "F.leaky_relu({}, 0.1)", "torch.relu({})", "{}.tanh()", "torch.sin({})", "{} * {}",
)


@dataclass
class Value:
    """A tensor in the generated forward: its Python name and per-sample shape."""

    name: str
    shape: tuple
    fresh: bool = False  # produced by a Linear/Conv/add and read by nobody yet: safe to mutate in place
    uses: int = 0


@dataclass
class Arch:
    """One generated architecture: its seed, its source and the features it used."""

    seed: int
    n_ops: int
    source: str
    features: list = field(default_factory=list)
    exclude: tuple = ()

    def build(self):
        """Execute the source and return ``(model, inputs)``."""
        ns: dict = {"__name__": f"fxjac_fuzz_{self.seed}"}
        exec(compile(self.source, f"<fuzz seed={self.seed} n_ops={self.n_ops}>", "exec"), ns)
        return ns["build"]()

    def describe(self) -> str:
        """The replay header and the source, for assertion messages."""
        return (f"# fuzz architecture seed={self.seed} n_ops={self.n_ops} features={sorted(set(self.features))}\n"
                f"# replay: python tests/fuzz/gen.py {self.seed} {self.n_ops} {','.join(self.exclude)}\n"
                f"{self.source}")


class _Gen:
    def __init__(self, seed: int, exclude=()):
        self.r = random.Random(seed)
        self.seed = seed
        self.exclude = set(exclude)
        self.init: list = []
        self.fwd: list = []
        self.values: list = []
        self.linears: list = []  # (attr, in, out) of Linear modules, for tying
        self.n_mod = 0
        self.n_val = 0
        self.features: list = []

    # --- helpers -----------------------------------------------------------------------------------------

    def ok(self, feature: str) -> bool:
        return feature not in self.exclude

    def module(self, prefix: str, ctor: str) -> str:
        attr = f"{prefix}{self.n_mod}"
        self.n_mod += 1
        self.init.append(f"self.{attr} = {ctor}")
        return attr

    def new(self, expr: str, shape: tuple, fresh: bool = False, feature: str = "") -> Value:
        name = f"h{self.n_val}"
        self.n_val += 1
        self.fwd.append(f"{name} = {expr}")
        v = Value(name, tuple(shape), fresh)
        self.values.append(v)
        if feature:
            self.features.append(feature)
        return v

    def use(self, v: Value) -> str:
        v.uses += 1
        v.fresh = False
        return v.name

    def pick(self) -> Value:
        """Mostly the latest value (depth), sometimes an older one (a skip or a second branch)."""
        u = self.r.random()
        if u < 0.5:
            return self.values[-1]
        frontier = [v for v in self.values if v.uses == 0]
        if u < 0.8 and frontier:
            return self.r.choice(frontier)
        return self.r.choice(self.values)

    def width(self) -> int:
        return self.r.randint(2, 6)

    # --- unary ops ---------------------------------------------------------------------------------------

    def linear(self, v: Value, out: int = 0) -> Value:
        out = out or self.width()
        bias = self.r.random() < 0.8
        attr = self.module("fc", f"nn.Linear({v.shape[-1]}, {out}, bias={bias})")
        self.linears.append((attr, v.shape[-1], out))
        return self.new(f"self.{attr}({self.use(v)})", v.shape[:-1] + (out,), fresh=True, feature="linear")

    def tied(self, v: Value):
        cands = [m for m in self.linears if m[1] == v.shape[-1]]
        if not cands:  # a square Linear applied twice in a row
            d = v.shape[-1]
            attr = self.module("fc", f"nn.Linear({d}, {d})")
            self.linears.append((attr, d, d))
            v = self.new(f"torch.tanh(self.{attr}({self.use(v)}))", v.shape, feature="linear")
            cands = [(attr, d, d)]
        attr, _, out = self.r.choice(cands)
        return self.new(f"self.{attr}({self.use(v)})", v.shape[:-1] + (out,), fresh=True, feature="tied")

    def conv1d(self, v: Value):
        if len(v.shape) != 2:
            return None
        c, length = v.shape
        k = self.r.choice((1, 3))
        out = self.width()
        attr = self.module("conv", f"nn.Conv1d({c}, {out}, {k}, padding={k // 2})")
        return self.new(f"self.{attr}({self.use(v)})", (out, length), fresh=True, feature="conv1d")

    def act(self, v: Value) -> Value:
        form = self.r.choice(_ACTS)
        n = self.use(v)
        return self.new(form.format(n, n), v.shape, feature="act")

    def relu_inplace(self, v: Value):
        # Only on a fresh Linear/Conv/add output nobody has read: the mutation changes no earlier reader and no
        # tensor autograd saved (tanh saves its output, for one).
        if not v.fresh:
            return None
        attr = self.module("relu", "nn.ReLU(inplace=True)")
        return self.new(f"self.{attr}({self.use(v)})", v.shape, feature="relu_inplace")

    def layernorm(self, v: Value):
        # Over 2 entries a norm is a sign function (zero derivative, results at rounding level): 3 or more.
        if v.shape[-1] < 3:
            return None
        affine = self.r.random() < 0.7
        attr = self.module("ln", f"nn.LayerNorm({v.shape[-1]}, elementwise_affine={affine})")
        return self.new(f"self.{attr}({self.use(v)})", v.shape, feature="layernorm")

    def groupnorm(self, v: Value):
        c = v.shape[0]
        per = 1 if len(v.shape) == 1 else v.shape[1]
        groups = [g for g in range(1, c + 1) if c % g == 0 and (c // g) * per >= 3]
        if not groups:
            return None
        attr = self.module("gn", f"nn.GroupNorm({self.r.choice(groups)}, {c})")
        return self.new(f"self.{attr}({self.use(v)})", v.shape, feature="groupnorm")

    def batchnorm(self, v: Value) -> Value:
        attr = self.module("bn", f"nn.BatchNorm1d({v.shape[0]})")
        return self.new(f"self.{attr}({self.use(v)})", v.shape, feature="batchnorm")

    def softmax(self, v: Value) -> Value:
        fn = self.r.choice(("torch.softmax({}, dim=-1)", "F.log_softmax({}, dim=-1)", "{}.softmax(-1)"))
        return self.new(fn.format(self.use(v)), v.shape, feature="softmax")

    def flatten(self, v: Value):
        if len(v.shape) != 2:
            return None
        form = self.r.choice(("{}.flatten(1)", "{}.reshape({}.shape[0], -1)", "torch.flatten({}, 1)"))
        n = self.use(v)
        return self.new(form.format(n, n), (v.shape[0] * v.shape[1],), feature="flatten")

    def unflatten(self, v: Value):
        if len(v.shape) != 1:
            return None
        d = v.shape[0]
        splits = [(a, d // a) for a in range(2, d) if d % a == 0]
        if not splits:
            return None
        a, b = self.r.choice(splits)
        n = self.use(v)
        form = self.r.choice((f"{n}.view(-1, {a}, {b})", f"{n}.unflatten(1, ({a}, {b}))",
                              f"{n}.reshape({n}.shape[0], {a}, {b})"))
        return self.new(form, (a, b), feature="unflatten")

    def transpose(self, v: Value):
        if len(v.shape) != 2:
            return None
        n = self.use(v)
        form = self.r.choice((f"{n}.transpose(1, 2)", f"{n}.permute(0, 2, 1)", f"{n}.transpose(-1, -2).contiguous()"))
        return self.new(form, (v.shape[1], v.shape[0]), feature="transpose")

    def slice(self, v: Value):
        last = v.shape[-1]
        if last < 3:
            return None
        k = self.r.randint(2, last - 1)
        n = self.use(v)
        full = ":, " * len(v.shape)
        form = self.r.choice((f"{n}[{full}:{k}]", f"{n}[..., {last - k}:]", f"{n}.narrow(-1, 1, {k})"))
        return self.new(form, v.shape[:-1] + (k,), feature="slice")

    def pool(self, v: Value):
        if len(v.shape) != 2 or v.shape[1] < 4:
            return None
        fn = self.r.choice(("F.avg_pool1d", "F.max_pool1d"))
        return self.new(f"{fn}({self.use(v)}, 2)", (v.shape[0], v.shape[1] // 2), feature="pool")

    def attention(self, v: Value):
        if len(v.shape) != 2:
            return None
        t, d = v.shape
        dk, dv = self.width(), self.width()
        n = self.use(v)
        q = self.module("q", f"nn.Linear({d}, {dk})")
        k = q if self.r.random() < 0.25 else self.module("k", f"nn.Linear({d}, {dk}, bias=False)")
        val = self.module("v", f"nn.Linear({d}, {dv})")
        self.linears.append((val, d, dv))
        a = f"a{self.n_val}"
        self.fwd.append(f"{a} = torch.softmax(self.{q}({n}) @ self.{k}({n}).transpose(-2, -1) * {dk ** -0.5:.4f}, "
                        "dim=-1)")
        return self.new(f"{a} @ self.{val}({n})", (t, dv), feature="attention")

    def mask(self, v: Value) -> Value:
        n = self.use(v)
        form = self.r.choice((f"{n} * ({n} > 0).to({n}.dtype)", f"torch.where({n} > 0, {n}, 0.1 * {n})",
                              f"{n} * {n}.detach().abs().argmax(-1, keepdim=True).to({n}.dtype)"))
        return self.new(form, v.shape, feature="mask")

    def param(self, v: Value) -> Value:
        """A raw ``nn.Parameter`` read in ``forward``: scaled, shifted, or first transformed on its own (an
        unbatched value meeting a batched one)."""
        shape = self.r.choice([v.shape[-1:], v.shape, ()])
        attr = f"p{self.n_mod}"
        self.n_mod += 1
        self.init.append(f"self.{attr} = nn.Parameter(0.5 + 0.5 * torch.rand({tuple(shape)}))")
        n = self.use(v)
        form = self.r.choice((f"{n} * self.{attr}", f"{n} + self.{attr}", f"self.{attr}.exp() * {n}",
                              f"{n} * torch.tanh(self.{attr} * self.{attr})", f"{n} / (1 + self.{attr})"))
        return self.new(form, v.shape, feature="param")

    def reduce(self, v: Value) -> Value:
        """Reductions broadcast back: centring, scaling by a norm, a max."""
        n = self.use(v)
        d = self.r.choice((-1, 1)) if len(v.shape) == 2 else -1
        form = self.r.choice((f"{n} - {n}.mean({d}, keepdim=True)", f"{n} / (1 + {n}.norm(dim={d}, keepdim=True))",
                              f"{n} * {n}.sum({d}, keepdim=True)", f"{n} - {n}.amax({d}, keepdim=True)",
                              f"{n} + {n}.max(dim={d}, keepdim=True).values",
                              f"{n} * {n}.pow(2).mean({d}, keepdim=True).add(1e-1).rsqrt()"))
        return self.new(form, v.shape, feature="reduce")

    def elementwise(self, v: Value) -> Value:
        """Element-wise ops that are not activations."""
        n = self.use(v)
        form = self.r.choice((f"{n}.clamp(-0.5, 0.5)", f"{n}.abs()", f"{n}.pow(3)", f"{n} / (1 + {n} * {n})",
                              f"torch.sqrt({n} * {n} + 1)", f"-{n}", f"2.0 * {n} - 1", f"1 - {n}",
                              f"torch.log1p({n}.exp())", f"F.hardtanh({n})"))
        return self.new(form, v.shape, feature="elementwise")

    def stack(self, v: Value):
        """``torch.stack`` of two same-shape values: rank 1 -> rank 2."""
        if len(v.shape) != 1:
            return None
        u = self.partner(v)
        if u is None:
            return None
        return self.new(f"torch.stack([{self.use(v)}, {self.use(u)}], dim=1)", (2, v.shape[0]), feature="stack")

    def unsqueeze(self, v: Value):
        if len(v.shape) != 1:
            return None
        n = self.use(v)
        form = self.r.choice((f"{n}.unsqueeze(1)", f"{n}[:, None, :]", f"{n}.view({n}.size(0), 1, -1)"))
        return self.new(form, (1, v.shape[0]), feature="unsqueeze")

    def expand(self, v: Value):
        """A broadcast copy: a mean over the last axis expanded back, or a rank-1 value repeated."""
        n = self.use(v)
        if len(v.shape) == 1 or self.r.random() < 0.5:
            return self.new(f"{n}.mean(-1, keepdim=True).expand_as({n}) * {n}", v.shape, feature="expand")
        c, length = v.shape
        return self.new(f"{n}[:, :1, :].expand(-1, {c}, -1) + {n}.repeat(1, 1, 1)", v.shape, feature="expand")

    def glu(self, v: Value):
        """Split into halves (a tuple output and getitem) and gate one with the other."""
        if v.shape[-1] % 2 or v.shape[-1] < 4:
            return None
        n = self.use(v)
        half = v.shape[-1] // 2
        form = self.r.choice((f"F.glu({n}, dim=-1)", f"{n}.chunk(2, dim=-1)[0] * torch.sigmoid({n}.chunk(2, -1)[1])",
                              f"torch.split({n}, {half}, dim=-1)[1] * {n}[..., :{half}]"))
        return self.new(form, v.shape[:-1] + (half,), feature="glu")

    def pad(self, v: Value) -> Value:
        n = self.use(v)
        return self.new(f"F.pad({n}, (1, 0))", v.shape[:-1] + (v.shape[-1] + 1,), feature="pad")

    def conv_strided(self, v: Value):
        if len(v.shape) != 2 or v.shape[1] < 4:
            return None
        c, length = v.shape
        out = self.width()
        stride, dil = self.r.choice(((2, 1), (1, 2), (2, 1)))
        groups = self.r.choice([g for g in (1, 2) if c % g == 0 and out % g == 0])
        attr = self.module("conv", f"nn.Conv1d({c}, {out}, 2, stride={stride}, dilation={dil}, groups={groups})")
        l_out = (length - dil * (2 - 1) - 1) // stride + 1
        return self.new(f"self.{attr}({self.use(v)})", (out, l_out), fresh=True, feature="conv_strided")

    def mha(self, v: Value):
        """``nn.MultiheadAttention`` (batch first, decomposed by fxjac) or ``F.scaled_dot_product_attention``."""
        if len(v.shape) != 2:
            return None
        t, d = v.shape
        use_mha = d % 2 == 0 and self.ok("mha") and (not self.ok("sdpa") or self.r.random() < 0.5)
        if not use_mha and not self.ok("sdpa"):
            return None
        n = self.use(v)
        if use_mha:
            attr = self.module("mha", f"nn.MultiheadAttention({d}, 2, batch_first=True)")
            return self.new(f"self.{attr}({n}, {n}, {n}, need_weights=False)[0]", v.shape, feature="mha")
        q = self.module("sq", f"nn.Linear({d}, {d})")
        causal = self.r.random() < 0.5
        return self.new(f"F.scaled_dot_product_attention(self.{q}({n}), {n}, {n}, is_causal={causal})", v.shape,
                        feature="sdpa")

    def instancenorm(self, v: Value):
        if len(v.shape) != 2 or v.shape[1] < 3:
            return None
        attr = self.module("inorm", f"nn.InstanceNorm1d({v.shape[0]}, affine=True)")
        return self.new(f"self.{attr}({self.use(v)})", v.shape, feature="instancenorm")

    def softmax_dim1(self, v: Value):
        if len(v.shape) != 2 or v.shape[0] < 2:
            return None
        return self.new(f"torch.softmax({self.use(v)}, dim=1)", v.shape, feature="softmax")

    def einsum(self, v: Value):
        """A bilinear contraction of a value with a second branch (``einsum`` or ``bmm``)."""
        if len(v.shape) != 2:
            return None
        u = self.partner(v)
        if u is None:
            return None
        a, b = self.use(v), self.use(u)
        form = self.r.choice((f"torch.einsum('bij,bkj->bik', {a}, {b})", f"torch.bmm({a}, {b}.transpose(1, 2))",
                              f"{a} @ {b}.mT"))
        return self.new(form, (v.shape[0], v.shape[0]), feature="einsum")

    # --- binary ops (fan-in) -----------------------------------------------------------------------------

    def partner(self, v: Value, same_last: bool = True):
        """Another value to combine with ``v``: one of equal shape, or a Linear projection of one whose leading
        dims match (so fan-out and fan-in both happen)."""
        same = [u for u in self.values if u.shape == v.shape and u is not v]
        if same and self.r.random() < 0.7:
            return self.r.choice(same)
        lead = [u for u in self.values if u.shape[:-1] == v.shape[:-1] and u is not v]
        if not lead:
            return v if self.r.random() < 0.3 else None  # v (op) v: the same node twice
        u = self.r.choice(lead)
        if same_last and u.shape != v.shape:
            u = self.linear(u, v.shape[-1])
        return u

    def binary(self, v: Value, kind: str):
        u = self.partner(v, same_last=kind != "cat")
        if u is None or kind == "cat" and v.shape[-1] + u.shape[-1] > 8:
            return None
        if kind == "iadd":
            # ``h += u`` on a fresh tensor: mutate, then keep the same Python name.
            if not v.fresh or u is v:
                return None
            self.fwd.append(f"{v.name} += {self.use(u)}")
            v.fresh = False
            self.features.append("iadd")
            return v
        a, b = self.use(v), self.use(u)
        if kind == "add":
            return self.new(f"{a} + {b}", v.shape, fresh=True, feature="add")
        if kind == "mul":
            return self.new(f"{a} * {b}", v.shape, feature="mul")
        return self.new(f"torch.cat([{a}, {b}], dim=-1)", v.shape[:-1] + (v.shape[-1] + u.shape[-1],),
                        feature="cat")

    # --- the whole model ---------------------------------------------------------------------------------

    def step(self) -> None:
        kinds = ["linear", "linear", "act", "act", "add", "mul", "cat", "iadd", "relu_inplace", "layernorm",
                 "groupnorm", "batchnorm", "softmax", "flatten", "unflatten", "transpose", "slice", "conv1d",
                 "conv1d", "pool", "attention", "tied", "mask", "dead", "param", "param", "reduce", "elementwise",
                 "stack", "unsqueeze", "expand", "glu", "pad", "conv_strided", "mha", "instancenorm",
                 "softmax_dim1", "einsum"]
        for _ in range(20):
            kind = self.r.choice(kinds)
            if not (self.ok("mha") or self.ok("sdpa") if kind == "mha" else self.ok(
                    {"softmax_dim1": "softmax"}.get(kind, kind))):
                continue
            v = self.pick()
            if v.fresh and self.r.random() < 0.35:  # mutate fresh values often
                kind = self.r.choice([k for k in ("relu_inplace", "iadd") if self.ok(k)] or [kind])
            if kind in ("add", "mul", "cat", "iadd"):
                out = self.binary(v, kind)
            elif kind == "dead":
                attr = self.module("dead", f"nn.Linear({v.shape[-1]}, 2)")
                self.fwd.append(f"{attr}_out = torch.tanh(self.{attr}({self.use(v)}))  # a dead branch")
                self.features.append("dead")
                return
            else:
                out = getattr(self, kind)(v)
            if out is not None:
                # Keep shapes small: a Linear narrows the last axis of a value with more than 24 entries.
                if len(out.shape) == 1 and out.shape[0] > 12:
                    self.linear(out, self.width())
                elif len(out.shape) == 2 and out.shape[0] * out.shape[1] > 24:
                    self.linear(out, self.r.randint(2, 3))
                return

    def source(self, n_ops: int) -> str:
        r = self.r
        batch = r.randint(2, 3)
        shape = (r.randint(2, 6),) if r.random() < 0.4 else (r.randint(2, 4), r.randint(2, 4))
        self.values.append(Value("x", shape))
        for _ in range(n_ops):
            self.step()
        out = self.values[-1]
        # Fan-in: the branches nobody read join the output (projected, added), except some left dead.
        for u in [u for u in self.values[:-1] if u.uses == 0 and u.name != "x"]:
            if r.random() < 0.2:
                continue
            if u.shape[:-1] == out.shape[:-1]:
                pass
            elif len(u.shape) == 2 and len(out.shape) == 1 and self.ok("flatten"):
                u = self.new(f"{self.use(u)}.flatten(1)", (u.shape[0] * u.shape[1],), feature="flatten")
            else:
                continue
            p = self.linear(u, out.shape[-1])
            out = self.new(f"{self.use(out)} + {self.use(p)}", out.shape, feature="add")
        if out.name == "x" or r.random() < 0.6 or not self.linears:
            out = self.linear(out, r.randint(2, 4))
        if self.ok("unused") and r.random() < 0.3:
            self.module("unused", f"nn.Linear({r.randint(2, 4)}, 2)  # never called")
            self.features.append("unused")
        frozen = []
        if self.ok("frozen") and r.random() < 0.3 and len(self.linears) > 1:
            frozen.append(r.choice(self.linears[:-1])[0])
            self.features.append("frozen")
        lines = [
            "import torch",
            "import torch.nn as nn",
            "import torch.nn.functional as F",
            "",
            "from fxjac.zoo import randomize_norm_layers_",
            "",
            "",
            "class Net(nn.Module):",
            "    def __init__(self):",
            "        super().__init__()",
            *[f"        {ln}" for ln in self.init],
            *[f"        self.{a}.requires_grad_(False)" for a in frozen],
            "",
            "    def forward(self, x):",
            *[f"        {ln}" for ln in self.fwd],
            f"        return {out.name}",
            "",
            "",
            "def build():",
            f"    torch.manual_seed({self.seed})",
            "    model = randomize_norm_layers_(Net().double()).eval()",
            f"    x = torch.randn({', '.join(map(str, (batch, *shape)))}, dtype=torch.float64)",
            "    return model, (x,)",
            "",
        ]
        return "\n".join(lines)


def generate(seed: int, n_ops: int = 6, exclude=()) -> Arch:
    """The architecture of ``seed`` with ``n_ops`` random steps (features in ``exclude`` left out)."""
    g = _Gen(seed, exclude)
    src = g.source(n_ops)
    return Arch(seed, n_ops, src, g.features, tuple(sorted(exclude)))


if __name__ == "__main__":
    import sys

    seed = int(sys.argv[1]) if len(sys.argv) > 1 else 0
    n = int(sys.argv[2]) if len(sys.argv) > 2 else 6
    excluded = tuple(f for f in sys.argv[3].split(",") if f) if len(sys.argv) > 3 else ()
    print(generate(seed, n, excluded).source)
