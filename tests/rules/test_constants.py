"""Constants for differentiation: every registered spelling applied to a value that carries a derivative.

Autograd gives these ops a zero derivative (or none); fxjac must give the same products, never an error or a
fallback. One model applies them all, each feeding the output only through a mask, an index or a size.
"""

import sys
from pathlib import Path

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from reference import check_direction_products  # noqa: E402


class Constants(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        h = self.fc(x)
        z = torch.zeros_like(h)
        masks = [h.eq(h), h.ne(z), h.lt(z), h.le(z), h.gt(z), h.ge(z), torch.eq(h, z), torch.ne(h, z),
                 torch.lt(h, z), torch.le(h, z), torch.gt(h, z), torch.ge(h, z), h == z, h != z, h < z, h <= z,
                 h > z, h >= z, h.isnan(), h.isinf(), h.isfinite(), torch.isnan(h), torch.isinf(h),
                 torch.isfinite(h), h.logical_not(), h.logical_and(h), h.logical_or(z), torch.logical_not(h),
                 torch.logical_and(h, z), torch.logical_or(h, z), h.bool(), (h > 0) & (h < 1), (h > 0) | (h < -1),
                 ~(h > 0), (h > 0) ^ (h < 0)]
        keep = masks[0].to(h.dtype)
        for m in masks[1:]:
            keep = keep + m.to(h.dtype)
        ints = [h.argmax(-1), h.argmin(-1), torch.argmax(h, -1), torch.argmin(h, -1), h.argsort(-1)[:, 0],
                torch.argsort(h, -1)[:, 0], h.long()[:, 0], h.int()[:, 0], h.short()[:, 0], h.byte()[:, 0],
                h.sign().long()[:, 0], h.floor().long()[:, 0], h.ceil().long()[:, 0], h.round().long()[:, 0],
                h.trunc().long()[:, 0], torch.sign(h).long()[:, 0], torch.floor(h).long()[:, 0],
                torch.ceil(h).long()[:, 0], torch.round(h).long()[:, 0], torch.trunc(h).long()[:, 0],
                torch.floor_divide(h, 2).long()[:, 0], (h // 2).long()[:, 0],
                torch.bucketize(h, torch.tensor([0.0]))[:, 0], torch.searchsorted(torch.tensor([0.0, 1.0]), h)[:, 0],
                h.nonzero().shape[0] * torch.ones_like(h[:, 0]).long(),
                torch.nonzero(h).shape[0] * torch.ones_like(h[:, 0]).long()]
        idx = ints[0]
        for i in ints[1:]:
            idx = idx + i * 0
        idx = idx.clamp(0, 3).unsqueeze(-1)
        size = h.dim() + h.ndimension() + h.numel() // h.numel() + torch.numel(h) // h.numel() + h.size(1)
        flag = h.any().to(h.dtype) + h.all().to(h.dtype) + h.detach().sum() * 0 + torch.detach(h).sum() * 0
        filled = h.new_zeros(h.shape) + h.new_ones(h.shape) + h.new_full(h.shape, 2.0) + h.new_tensor(1.0) + \
            h.new_empty(h.shape).zero_() + torch.ones_like(h) + torch.full_like(h, 3.0)
        scale = h.abs().max().item() * 0 + 1.0
        return h.type(torch.float64) * keep * scale + h.gather(-1, idx) * size + flag * filled


def test_constant_spellings_have_zero_derivatives():
    torch.manual_seed(0)
    model = Constants().double()
    x = torch.randn(3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    check_direction_products(model, (x,), products=("jvp", "vjp"))


def test_a_float_attention_mask_with_a_derivative():
    """A learnable float mask reaches nn.MultiheadAttention's mask reshaping (heads_view) with a tangent."""

    class Masked(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(4, 2, batch_first=True)
            self.bias = nn.Parameter(torch.randn(3, 3) * 0.1)

        def forward(self, x):
            return self.attn(x, x, x, attn_mask=self.bias, need_weights=True)[0]  # the unfused path

    torch.manual_seed(0)
    model = Masked().double().eval()
    x = torch.randn(2, 3, 4, dtype=torch.float64)
    check_direction_products(model, (x,), products=("jvp", "vjp"))
