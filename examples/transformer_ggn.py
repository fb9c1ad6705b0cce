"""Which parameters of a small transformer matter most? The diagonal of its GGN, summed per module.

The GGN diagonal of the cross-entropy, diag(Σ_n J_nᵀ H_n J_n) (fxjac.ggn, exact, never forming J), measures
how much the loss curves along each parameter: the Fisher/GGN "importance" used for pruning, EWC and Laplace.
The model is the zoo's pre-LN transformer (explicit attention) on a toy task: is the first token's feature
larger than the mean of the others?

    python examples/transformer_ggn.py [--quick] [--out DIR]
"""

import argparse
import time
from collections import OrderedDict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

import fxjac  # noqa: E402
from fxjac.zoo import Transformer  # noqa: E402


def module_of(name):
    """Group a parameter name by its module, two levels deep for the blocks (blocks.0.attn, blocks.0.mlp)."""
    parts = name.split(".")
    if parts[0] == "blocks":
        return ".".join(parts[:3])
    return parts[0]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smaller model and data set (for CI)")
    parser.add_argument("--out", default="fxjac-examples", help="folder for the picture")
    args = parser.parse_args()
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    d, seq, layers, n, steps = (16, 6, 2, 32, 20) if args.quick else (32, 12, 2, 128, 60)
    x = torch.randn(n, seq, d, generator=g)
    y = (x[:, 0, 0] > x[:, 1:, 0].mean(1)).long()
    model = Transformer(d=d, heads=4, layers=layers, seq=seq, classes=2)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    model.eval()

    t0 = time.perf_counter()
    product = fxjac.ggn(model, loss="cross_entropy", out="diag")
    _, diag = product(x, target=y)                                   # [P]
    elapsed = time.perf_counter() - t0
    per_param = fxjac.unflatten(product, diag)                       # {name: tensor shaped like the parameter}
    totals, sizes = OrderedDict(), OrderedDict()
    for name, value in per_param.items():
        key = module_of(name)
        totals[key] = totals.get(key, 0.0) + value.sum().item()
        sizes[key] = sizes.get(key, 0) + value.numel()

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), constrained_layout=True)
    names = list(totals)
    axes[0].barh(names, [totals[k] for k in names], color="#4c72b0")
    axes[0].set_xlabel("sum of diag GGN (total curvature)")
    axes[0].invert_yaxis()
    axes[1].barh(names, [totals[k] / sizes[k] for k in names], color="#dd8452")
    axes[1].set_xlabel("mean diag GGN per parameter")
    axes[1].invert_yaxis()
    axes[1].set_yticklabels([])
    fig.suptitle(f"Transformer (d={d}, {layers} blocks, P={diag.numel()}): GGN diagonal per module")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "transformer_ggn.png"
    fig.savefig(path, dpi=90)
    print(f"exact GGN diagonal of {diag.numel()} parameters over {n} sequences in {elapsed:.2f} s")
    for k in sorted(names, key=lambda k: -totals[k] / sizes[k])[:5]:
        print(f"  {k:<18} mean {totals[k] / sizes[k]:.3e}  ({sizes[k]} parameters)")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
