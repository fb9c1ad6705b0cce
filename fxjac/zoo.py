"""Model zoo shared by the fxjac test-suite, demo and benchmarks.

The zoo collects small, plain-PyTorch models that between them exercise the
graph patterns a Jacobian-product engine built on ``torch.fx`` has to handle:
dense layers, convolutions and pooling, batch/group/layer normalisation,
in-place operations, residual additions, skip concatenations, up-sampling,
three flavours of self-attention, multiple inputs and shape arithmetic on
traced sizes.

Every model is traceable with plain ``torch.fx.symbolic_trace``. Note that
the default tracer keeps every ``torch.nn`` module as a leaf; a tracer that
descends into them fails on ``nn.MultiheadAttention`` and ``nn.BatchNorm2d``
(their ``forward`` branches on tensor properties), so entries list such types
in :attr:`ZooEntry.leaf_modules`.

Each model is registered in :data:`ZOO` as a :class:`ZooEntry` with two size
presets, ``"small"`` (tiny, for float64 Jacobian tests on CPU) and ``"bench"``
(realistic sizes for the demo and benchmarks). Use :func:`build` and
:func:`example_inputs` rather than instantiating the classes directly; they
fix the seed, randomise normalisation statistics, switch to eval mode and
convert the dtype.

Example:
    >>> from fxjac import zoo
    >>> model, sizes = zoo.build("resnet", preset="small")
    >>> (x,) = zoo.example_inputs("resnet", batch=3)
    >>> model(x).shape
    torch.Size([3, 3])
"""

from __future__ import annotations

import functools
import math
import types
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "MLP",
    "CNN",
    "BasicBlock",
    "ResNet",
    "UNet",
    "Transformer",
    "TwoInput",
    "ShapeArith",
    "SmallMLP",
    "LargeMLP",
    "randomize_norm_layers_",
    "count_parameters",
    "ZooSizes",
    "ZooEntry",
    "ZOO",
    "PRESETS",
    "names",
    "get",
    "build",
    "example_inputs",
]

PRESETS = ("small", "bench")
"""Names of the size presets every zoo entry provides."""


# ---------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------


class MLP(nn.Module):
    """Fully connected network with an activation between consecutive layers."""

    def __init__(
        self,
        sizes: tuple[int, ...] = (784, 512, 512, 10),
        act: type[nn.Module] = nn.Tanh,
    ) -> None:
        """Creates the layers.

        Args:
            sizes: Layer widths ``(in, hidden..., out)``; at least two entries.
            act: Activation module class, instantiated once per hidden layer.
        """
        super().__init__()
        if len(sizes) < 2:
            raise ValueError(f"MLP needs at least input and output sizes, got {sizes}")
        self.sizes = tuple(sizes)
        layers: list[nn.Module] = []
        for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:])):
            layers.append(nn.Linear(fan_in, fan_out))
            # No activation after the last layer: the outputs are logits.
            if i < len(sizes) - 2:
                layers.append(act())
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Maps ``[B, sizes[0]]`` to ``[B, sizes[-1]]``."""
        return self.net(x)


class SmallMLP(MLP):
    """The MLP with sizes ``(20, 32, 32, 5)`` used for exact-vs-reference checks."""

    def __init__(self, sizes: tuple[int, ...] = (20, 32, 32, 5), act: type[nn.Module] = nn.Tanh) -> None:
        """Creates the layers.

        Args:
            sizes: Layer widths; defaults to ``(20, 32, 32, 5)``.
            act: Activation module class.
        """
        super().__init__(sizes=sizes, act=act)


class LargeMLP(MLP):
    """An MLP with more than a million parameters (1,333,770 by default).

    Used by benchmarks where materialising a full ``P x P`` matrix is out of
    the question, so only matrix-free products are feasible.
    """

    def __init__(self, sizes: tuple[int, ...] = (784, 1024, 512, 10), act: type[nn.Module] = nn.Tanh) -> None:
        """Creates the layers.

        Args:
            sizes: Layer widths; defaults to ``(784, 1024, 512, 10)``.
            act: Activation module class.
        """
        super().__init__(sizes=sizes, act=act)


class CNN(nn.Module):
    """Two conv3x3 + ReLU + MaxPool2d(2) blocks followed by a linear classifier."""

    def __init__(self, in_ch: int = 3, size: int = 32, classes: int = 10, width: int = 16) -> None:
        """Creates the layers.

        Args:
            in_ch: Input channels.
            size: Input height and width; must be divisible by 4.
            classes: Number of output logits.
            width: Channels of the first block; the second block has ``2 * width``.
        """
        super().__init__()
        if size % 4:
            raise ValueError(f"CNN input size must be divisible by 4, got {size}")
        self.features = nn.Sequential(
            nn.Conv2d(in_ch, width, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.fc = nn.Linear(2 * width * (size // 4) ** 2, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Maps ``[B, in_ch, size, size]`` to ``[B, classes]``."""
        return self.fc(torch.flatten(self.features(x), 1))


class BasicBlock(nn.Module):
    """ResNet basic block: conv-BN-ReLU-conv-BN plus shortcut, then ReLU.

    The shortcut is added in place (``out += identity``) and the ReLUs are
    in-place, as in torchvision, so the zoo covers in-place graph nodes.
    """

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1) -> None:
        """Creates the layers.

        Args:
            in_ch: Input channels.
            out_ch: Output channels.
            stride: Stride of the first convolution. A stride other than 1 or a
                change of channels adds a 1x1 conv + BN downsample shortcut.
        """
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_ch != out_ch:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_ch),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Applies the block to ``[B, in_ch, H, W]``."""
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class ResNet(nn.Module):
    """Small CIFAR-style ResNet with BatchNorm and in-place operations.

    Layout: stem conv3x3 + BN + ReLU(inplace), one stride-1 basic block at
    ``width`` channels, one stride-2 block with a 1x1 downsample shortcut to
    ``2 * width`` channels, ``blocks - 2`` further stride-1 blocks, then global
    average pooling, flatten and a linear classifier.

    BatchNorm layers start with trivial running statistics; use
    :func:`randomize_norm_layers_` (as :func:`build` does) before evaluating
    Jacobians so that the normalisation is not the identity.
    """

    def __init__(self, in_ch: int = 3, width: int = 16, blocks: int = 2, classes: int = 10) -> None:
        """Creates the layers.

        Args:
            in_ch: Input channels.
            width: Channels of the stem and first block.
            blocks: Number of basic blocks, at least 2.
            classes: Number of output logits.
        """
        super().__init__()
        if blocks < 2:
            raise ValueError(f"ResNet needs at least 2 blocks, got {blocks}")
        self.stem = nn.Sequential(
            nn.Conv2d(in_ch, width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
        )
        layers = [BasicBlock(width, width), BasicBlock(width, 2 * width, stride=2)]
        layers += [BasicBlock(2 * width, 2 * width) for _ in range(blocks - 2)]
        self.layers = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2 * width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Maps ``[B, in_ch, H, W]`` (H, W even) to ``[B, classes]``."""
        x = self.layers(self.stem(x))
        return self.fc(torch.flatten(self.pool(x), 1))


class UNet(nn.Module):
    """Two-level U-Net for dense regression.

    Down path: conv3x3 + ReLU, MaxPool2d, conv3x3 + GroupNorm + ReLU,
    MaxPool2d; a conv3x3 + ReLU bottleneck. Up path: bilinear ``nn.Upsample``
    in the first level and nearest ``F.interpolate`` in the second, each
    followed by ``torch.cat([up, skip], dim=1)`` and conv3x3 + ReLU. A final
    1x1 convolution produces ``out_ch`` channels at the input resolution.

    Both up-sampling styles are used on purpose: one is a module, the other a
    functional call, and a tracer sees them as different node kinds.
    """

    def __init__(self, in_ch: int = 1, base: int = 8, out_ch: int = 1) -> None:
        """Creates the layers.

        Args:
            in_ch: Input channels.
            base: Channels of the first level; deeper levels use 2x and 4x.
            out_ch: Output channels.
        """
        super().__init__()
        self.enc1 = nn.Sequential(nn.Conv2d(in_ch, base, 3, padding=1), nn.ReLU())
        self.pool1 = nn.MaxPool2d(2)
        # Two groups always divide 2 * base, so any base works.
        self.enc2 = nn.Sequential(
            nn.Conv2d(base, 2 * base, 3, padding=1), nn.GroupNorm(2, 2 * base), nn.ReLU()
        )
        self.pool2 = nn.MaxPool2d(2)
        self.bottleneck = nn.Sequential(nn.Conv2d(2 * base, 4 * base, 3, padding=1), nn.ReLU())
        self.up2 = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False)
        self.dec2 = nn.Sequential(nn.Conv2d(4 * base + 2 * base, 2 * base, 3, padding=1), nn.ReLU())
        self.dec1 = nn.Sequential(nn.Conv2d(2 * base + base, base, 3, padding=1), nn.ReLU())
        self.head = nn.Conv2d(base, out_ch, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Maps ``[B, in_ch, H, W]`` (H, W divisible by 4) to ``[B, out_ch, H, W]``."""
        s1 = self.enc1(x)
        s2 = self.enc2(self.pool1(s1))
        h = self.bottleneck(self.pool2(s2))
        h = self.dec2(torch.cat([self.up2(h), s2], dim=1))
        up = F.interpolate(h, scale_factor=2, mode="nearest")
        h = self.dec1(torch.cat([up, s1], dim=1))
        return self.head(h)


class ExplicitSelfAttention(nn.Module):
    """Multi-head self-attention written out with matmuls and softmax."""

    def __init__(self, d: int, heads: int) -> None:
        """Creates the layers.

        Args:
            d: Model width; must be divisible by ``heads``.
            heads: Number of attention heads.
        """
        super().__init__()
        self.heads = heads
        self.dh = d // heads
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Maps ``[B, T, d]`` to ``[B, T, d]``."""
        # Sizes are read from the tensor (not stored) so that the traced
        # graph works for any batch size and sequence length.
        b, t, d = x.shape[0], x.shape[1], x.shape[2]
        q, k, v = self.qkv(x).split(d, dim=-1)
        q = q.view(b, t, self.heads, self.dh).transpose(1, 2)
        k = k.view(b, t, self.heads, self.dh).transpose(1, 2)
        v = v.view(b, t, self.heads, self.dh).transpose(1, 2)
        att = q @ k.transpose(-2, -1) / math.sqrt(self.dh)
        att = att.softmax(dim=-1)
        out = (att @ v).transpose(1, 2).reshape(b, t, d)
        return self.proj(out)


class SDPASelfAttention(nn.Module):
    """Multi-head self-attention via ``F.scaled_dot_product_attention``."""

    def __init__(self, d: int, heads: int, causal: bool = False) -> None:
        """Creates the layers.

        Args:
            d: Model width; must be divisible by ``heads``.
            heads: Number of attention heads.
            causal: Whether to apply a causal mask (``is_causal``).
        """
        super().__init__()
        self.heads = heads
        self.dh = d // heads
        self.causal = causal
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Maps ``[B, T, d]`` to ``[B, T, d]``."""
        b, t, d = x.shape[0], x.shape[1], x.shape[2]
        q, k, v = self.qkv(x).split(d, dim=-1)
        q = q.view(b, t, self.heads, self.dh).transpose(1, 2)
        k = k.view(b, t, self.heads, self.dh).transpose(1, 2)
        v = v.view(b, t, self.heads, self.dh).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        return self.proj(out.transpose(1, 2).reshape(b, t, d))


class TransformerBlock(nn.Module):
    """Pre-LN encoder block: ``x + attn(ln1(x))`` then ``x + mlp(ln2(x))``."""

    def __init__(self, d: int, heads: int, attention: str = "explicit", causal: bool = False) -> None:
        """Creates the layers.

        Args:
            d: Model width.
            heads: Number of attention heads.
            attention: ``"explicit"``, ``"mha"`` or ``"sdpa"``.
            causal: Causal masking; only supported by ``"sdpa"``.
        """
        super().__init__()
        self.attention = attention
        self.ln1 = nn.LayerNorm(d)
        self.attn: nn.Module
        if attention == "explicit":
            self.attn = ExplicitSelfAttention(d, heads)
        elif attention == "mha":
            self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        elif attention == "sdpa":
            self.attn = SDPASelfAttention(d, heads, causal=causal)
        else:
            raise ValueError(f"unknown attention {attention!r}; use 'explicit', 'mha' or 'sdpa'")
        self.ln2 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Maps ``[B, T, d]`` to ``[B, T, d]``."""
        h = self.ln1(x)
        # self.attention is a plain string, so this branch is resolved at
        # trace time and leaves no control flow in the graph.
        if self.attention == "mha":
            h = self.attn(h, h, h, need_weights=False)[0]
        else:
            h = self.attn(h)
        x = x + h
        return x + self.mlp(self.ln2(x))


class Transformer(nn.Module):
    """Pre-LN transformer encoder classifier on float feature sequences.

    Inputs are ``[B, seq, d]`` float features to which a learned positional
    embedding is added; when ``vocab`` is given the input is instead
    ``[B, seq]`` integer tokens embedded by ``nn.Embedding`` (not used by the
    zoo entries, because Jacobians with respect to integer inputs are
    undefined). After the blocks come a final LayerNorm, the mean over the
    sequence and a linear head.
    """

    def __init__(
        self,
        d: int = 64,
        heads: int = 4,
        layers: int = 2,
        seq: int = 32,
        vocab: int | None = None,
        classes: int = 10,
        attention: str = "explicit",
        causal: bool = False,
    ) -> None:
        """Creates the layers.

        Args:
            d: Model width; must be divisible by ``heads``.
            heads: Number of attention heads.
            layers: Number of encoder blocks.
            seq: Sequence length (size of the positional embedding).
            vocab: Optional vocabulary size for token inputs.
            classes: Number of output logits.
            attention: ``"explicit"`` (matmul + softmax), ``"mha"``
                (``nn.MultiheadAttention``) or ``"sdpa"``
                (``F.scaled_dot_product_attention``).
            causal: Causal masking; only supported with ``attention="sdpa"``.
        """
        super().__init__()
        if d % heads:
            raise ValueError(f"d={d} must be divisible by heads={heads}")
        if causal and attention != "sdpa":
            raise ValueError("causal=True is only supported with attention='sdpa'")
        self.seq = seq
        self.embed = nn.Embedding(vocab, d) if vocab is not None else None
        # Scaled so that the embedding perturbs, rather than dominates, inputs.
        self.pos = nn.Parameter(0.1 * torch.randn(seq, d))
        self.blocks = nn.Sequential(*[TransformerBlock(d, heads, attention, causal) for _ in range(layers)])
        self.ln_f = nn.LayerNorm(d)
        self.head = nn.Linear(d, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Maps ``[B, seq, d]`` features (or ``[B, seq]`` tokens) to ``[B, classes]``."""
        if self.embed is not None:
            x = self.embed(x)
        x = x + self.pos
        x = self.ln_f(self.blocks(x))
        return self.head(x.mean(dim=1))


class TwoInput(nn.Module):
    """Model with two inputs, combined by concatenation and a product."""

    def __init__(self, d1: int = 5, d2: int = 3, hidden: int = 7, out: int = 4) -> None:
        """Creates the layers.

        Args:
            d1: Features of the first input ``x``.
            d2: Features of the second input ``z``.
            hidden: Width of each branch.
            out: Number of outputs.
        """
        super().__init__()
        self.branch_x = nn.Linear(d1, hidden)
        self.branch_z = nn.Linear(d2, hidden)
        self.out = nn.Linear(3 * hidden, out)

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """Maps ``x: [B, d1]`` and ``z: [B, d2]`` to ``[B, out]``."""
        a = torch.tanh(self.branch_x(x))
        b = torch.tanh(self.branch_z(z))
        return self.out(torch.cat([a, b, a * b], dim=1))


class ShapeArith(nn.Module):
    """Model whose forward does arithmetic on traced tensor sizes.

    It reads ``x.shape[0]`` and ``x.size(1)``, uses ``view``/``reshape`` with
    ``-1``, splits features by slicing at ``size // 2``, and uses
    ``torch.flatten``, ``permute``, ``sum``, ``mean``, ``unsqueeze`` and
    ``expand``, so a tracer must propagate shapes symbolically.
    """

    def __init__(self, channels: int = 4, length: int = 6, classes: int = 3) -> None:
        """Creates the layers.

        Args:
            channels: First per-sample input dimension.
            length: Second per-sample input dimension; ``channels * length`` must
                be even.
            classes: Number of output logits.
        """
        super().__init__()
        features = channels * length
        if features % 2:
            raise ValueError(f"channels * length must be even, got {features}")
        self.gate = nn.Linear(features // 2, features // 2)
        self.head = nn.Linear(features // 2, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Maps ``[B, channels, length]`` to ``[B, classes]``."""
        b = x.shape[0]
        flat = x.view(b, -1)
        half = flat.size(1) // 2
        left = flat[:, :half]
        right = torch.flatten(x, 1)[:, half:]
        gated = torch.tanh(self.gate(left)) * right
        # Pair feature i with feature i + F/2 and sum each pair.
        pairs = x.reshape(x.size(0), 2, -1).permute(0, 2, 1)
        h = gated + pairs.sum(dim=-1)
        # Centre each sample; expand makes the broadcast explicit in the graph.
        centre = h.mean(dim=1).unsqueeze(1).expand(-1, h.size(1))
        return self.head(h - centre)


# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------


_NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


@torch.no_grad()
def randomize_norm_layers_(model: nn.Module, generator: torch.Generator | None = None) -> nn.Module:
    """Gives normalisation layers non-trivial statistics, then sets eval mode.

    Freshly constructed BatchNorm layers have running mean 0 and variance 1,
    which makes them the identity in eval mode and hides bugs in how a
    Jacobian engine treats them. This fills running means with N(0, 0.1^2)
    values, running variances with U(0.5, 1.5) values, and the affine weights
    and biases of BatchNorm, GroupNorm and LayerNorm with values around 1 and
    0 respectively.

    Args:
        model: Module modified in place.
        generator: Optional random generator; the global one if ``None``.

    Returns:
        ``model``, in eval mode.
    """
    for module in model.modules():
        if not isinstance(module, _NORM_TYPES):
            continue
        if getattr(module, "running_mean", None) is not None:
            mean = torch.randn(module.running_mean.shape, generator=generator)
            module.running_mean.copy_(0.1 * mean)
            var = torch.rand(module.running_var.shape, generator=generator)
            module.running_var.copy_(0.5 + var)
        weight = getattr(module, "weight", None)
        if weight is not None:
            weight.copy_(1.0 + 0.1 * torch.randn(weight.shape, generator=generator))
        bias = getattr(module, "bias", None)
        if bias is not None:
            bias.copy_(0.1 * torch.randn(bias.shape, generator=generator))
    return model.eval()


def count_parameters(model: nn.Module) -> int:
    """Returns the number of trainable parameter entries P of ``model``."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _make(cls: type[nn.Module], **kwargs: Any) -> nn.Module:
    """Instantiates ``cls``, randomises its norm layers and sets eval mode."""
    return randomize_norm_layers_(cls(**kwargs))


def _factory(cls: type[nn.Module], **fixed: Any) -> Callable[..., nn.Module]:
    """Returns a factory building eval-mode ``cls`` models with ``fixed`` kwargs."""
    return functools.partial(_make, cls, **fixed)


# ---------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ZooSizes:
    """Sizes of one zoo entry under one preset.

    Attributes:
        kwargs: Constructor keyword arguments passed to the entry's factory.
        input_shapes: Per-sample shape of each forward input, without the
            batch dimension, e.g. ``((3, 32, 32),)``.
        output_shape: Per-sample output shape, without the batch dimension.
    """

    kwargs: Mapping[str, Any] = field(hash=False)
    input_shapes: tuple[tuple[int, ...], ...]
    output_shape: tuple[int, ...]

    def __post_init__(self) -> None:
        """Freezes ``kwargs``."""
        # A read-only view keeps the frozen dataclass effectively immutable.
        object.__setattr__(self, "kwargs", types.MappingProxyType(dict(self.kwargs)))


@dataclass(frozen=True)
class ZooEntry:
    """Description of one zoo model.

    Attributes:
        name: Registry key.
        factory: Callable taking the preset's kwargs and returning the model in
            eval mode with randomised normalisation statistics (float32).
        small: Tiny sizes for float64 Jacobian tests on a few CPU cores.
        bench: Realistic sizes for the demo and benchmarks.
        loss: Natural loss for a GGN: ``"cross_entropy"`` or ``"mse"``.
        classes_dim: Output dimension holding classes (or channels).
        task: ``"classification"`` or ``"regression"``.
        in_tests: Whether the entry belongs to the default test list.
        leaf_modules: Module types in the model that ``torch.fx`` cannot
            trace into and a tracer must keep as leaves. Every other module,
            including ``torch.nn`` ones like ``nn.Linear`` and ``nn.Conv2d``,
            can be traced through.
    """

    name: str
    factory: Callable[..., nn.Module]
    small: ZooSizes
    bench: ZooSizes
    loss: str
    classes_dim: int = 1
    task: str = "classification"
    in_tests: bool = True
    leaf_modules: tuple[type[nn.Module], ...] = ()

    def sizes(self, preset: str = "small") -> ZooSizes:
        """Returns the :class:`ZooSizes` of ``preset`` (``"small"`` or ``"bench"``)."""
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; use one of {PRESETS}")
        return getattr(self, preset)

    @property
    def input_shapes(self) -> tuple[tuple[int, ...], ...]:
        """Per-sample input shapes of the default ``"small"`` preset."""
        return self.small.input_shapes


def _transformer_entry(attention: str, leaf_modules: tuple[type[nn.Module], ...] = ()) -> ZooEntry:
    """Returns the registry entry of the transformer with the given attention."""
    return ZooEntry(
        name=f"transformer_{attention}",
        factory=_factory(Transformer, attention=attention),
        small=ZooSizes(dict(d=8, heads=2, layers=1, seq=5, classes=3), ((5, 8),), (3,)),
        bench=ZooSizes(dict(d=64, heads=4, layers=2, seq=32, classes=10), ((32, 64),), (10,)),
        loss="cross_entropy",
        leaf_modules=leaf_modules,
    )


ZOO: dict[str, ZooEntry] = {
    e.name: e
    for e in [
        ZooEntry(
            name="mlp",
            factory=_factory(MLP),
            small=ZooSizes(dict(sizes=(6, 5, 4, 3)), ((6,),), (3,)),
            bench=ZooSizes(dict(sizes=(784, 512, 512, 10)), ((784,),), (10,)),
            loss="cross_entropy",
        ),
        ZooEntry(
            name="cnn",
            factory=_factory(CNN),
            small=ZooSizes(dict(in_ch=2, size=8, classes=3, width=3), ((2, 8, 8),), (3,)),
            bench=ZooSizes(dict(in_ch=3, size=32, classes=10, width=16), ((3, 32, 32),), (10,)),
            loss="cross_entropy",
        ),
        ZooEntry(
            name="resnet",
            factory=_factory(ResNet),
            small=ZooSizes(dict(in_ch=2, width=4, blocks=2, classes=3), ((2, 8, 8),), (3,)),
            bench=ZooSizes(dict(in_ch=3, width=16, blocks=2, classes=10), ((3, 32, 32),), (10,)),
            loss="cross_entropy",
            # BatchNorm checks input.dim() in Python before calling F.batch_norm.
            leaf_modules=(nn.BatchNorm2d,),
        ),
        ZooEntry(
            name="unet",
            factory=_factory(UNet),
            small=ZooSizes(dict(in_ch=1, base=2, out_ch=1), ((1, 8, 8),), (1, 8, 8)),
            bench=ZooSizes(dict(in_ch=1, base=8, out_ch=1), ((1, 32, 32),), (1, 32, 32)),
            loss="mse",
            task="regression",
        ),
        _transformer_entry("explicit"),
        _transformer_entry("mha", leaf_modules=(nn.MultiheadAttention,)),
        _transformer_entry("sdpa"),
        ZooEntry(
            name="two_input",
            factory=_factory(TwoInput),
            # The default sizes are already tiny, so both presets share them.
            small=ZooSizes(dict(d1=5, d2=3, hidden=7, out=4), ((5,), (3,)), (4,)),
            bench=ZooSizes(dict(d1=5, d2=3, hidden=7, out=4), ((5,), (3,)), (4,)),
            loss="cross_entropy",
        ),
        ZooEntry(
            name="shape_arith",
            factory=_factory(ShapeArith),
            small=ZooSizes(dict(channels=4, length=6, classes=3), ((4, 6),), (3,)),
            bench=ZooSizes(dict(channels=8, length=32, classes=10), ((8, 32),), (10,)),
            loss="cross_entropy",
        ),
        ZooEntry(
            name="small_mlp",
            factory=_factory(SmallMLP),
            # Already small: both presets are the (20, 32, 32, 5) reference MLP.
            small=ZooSizes(dict(sizes=(20, 32, 32, 5)), ((20,),), (5,)),
            bench=ZooSizes(dict(sizes=(20, 32, 32, 5)), ((20,),), (5,)),
            loss="cross_entropy",
        ),
        ZooEntry(
            name="large_mlp",
            factory=_factory(LargeMLP),
            small=ZooSizes(dict(sizes=(12, 16, 8, 3)), ((12,),), (3,)),
            bench=ZooSizes(dict(sizes=(784, 1024, 512, 10)), ((784,),), (10,)),
            loss="cross_entropy",
            in_tests=False,
        ),
    ]
}
"""All zoo entries by name."""


def names(include_all: bool = False) -> list[str]:
    """Returns zoo entry names.

    Args:
        include_all: If ``False`` (default), only entries with ``in_tests``.

    Returns:
        Names in registry order.
    """
    return [n for n, e in ZOO.items() if include_all or e.in_tests]


def get(name: str) -> ZooEntry:
    """Returns the :class:`ZooEntry` called ``name``.

    Raises:
        KeyError: If there is no such entry; the message lists valid names.
    """
    try:
        return ZOO[name]
    except KeyError:
        raise KeyError(f"unknown zoo model {name!r}; choose from {sorted(ZOO)}") from None


def build(
    name: str,
    preset: str = "small",
    dtype: torch.dtype = torch.float64,
    seed: int = 0,
) -> tuple[nn.Module, ZooSizes]:
    """Builds a zoo model deterministically.

    Parameters are initialised in float32 under ``torch.manual_seed(seed)``
    and then converted, so different dtypes see the same values up to
    rounding. The global RNG state is restored afterwards.

    Args:
        name: Zoo entry name (see :data:`ZOO`).
        preset: ``"small"`` or ``"bench"``.
        dtype: Floating dtype of parameters and buffers.
        seed: Seed for parameter and statistics initialisation.

    Returns:
        The model in eval mode and the preset's :class:`ZooSizes`.
    """
    entry = get(name)
    sizes = entry.sizes(preset)
    # fork_rng keeps callers' random streams unaffected by building models.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = entry.factory(**sizes.kwargs)
    return model.to(dtype).eval(), sizes


def example_inputs(
    name: str,
    batch: int,
    preset: str = "small",
    dtype: torch.dtype = torch.float64,
    seed: int = 0,
) -> tuple[torch.Tensor, ...]:
    """Returns deterministic standard-normal inputs for a zoo model.

    A private generator is used, so the result depends only on the
    arguments and the global RNG is untouched.

    Args:
        name: Zoo entry name.
        batch: Batch size B.
        preset: ``"small"`` or ``"bench"``.
        dtype: Floating dtype of the inputs.
        seed: Seed of the private generator.

    Returns:
        One ``[B, *shape]`` tensor per entry of ``input_shapes``.
    """
    sizes = get(name).sizes(preset)
    gen = torch.Generator().manual_seed(seed)
    return tuple(
        torch.randn((batch, *shape), generator=gen, dtype=torch.float32).to(dtype)
        for shape in sizes.input_shapes
    )
