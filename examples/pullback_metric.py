"""The pull-back metric G(z) = J(z)ᵀ J(z) of a decoder w.r.t. its 2-D latent input, drawn as ellipses.

A decoder maps a 2-D latent z to a 3-D point on a curved surface (a "swiss roll" sheet); G(z) tells how far the
decoded point moves per step in latent space, in each direction. fxjac.jtmjp(decoder, wrt="input") gives all the
[2, 2] metrics of a batch of latent points in one backward sweep. Each ellipse is the set of latent steps
{dz : dzᵀ G dz = c}: small where the decoder stretches space, elongated where it compresses one direction.
The background is the magnification factor sqrt(det G).

    python examples/pullback_metric.py [--quick] [--out DIR]
"""

import argparse
import math
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
from matplotlib.patches import Ellipse  # noqa: E402

import fxjac  # noqa: E402


def surface(z):
    """The target sheet: a roll in 3-D, parametrised by z in [-1, 1]²."""
    t = 1.5 * math.pi * (z[:, 0] + 1.2)
    return torch.stack([t * torch.cos(t) / 6, 2 * z[:, 1], t * torch.sin(t) / 6], 1)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps and grid points (for CI)")
    parser.add_argument("--out", default="fxjac-examples", help="folder for the picture")
    args = parser.parse_args()
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    steps, grid_n, bg_n = (150, 8, 30) if args.quick else (800, 14, 100)
    decoder = nn.Sequential(nn.Linear(2, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 3))
    opt = torch.optim.Adam(decoder.parameters(), lr=3e-3)
    for _ in range(steps):
        z = torch.rand(256, 2, generator=g) * 2 - 1
        opt.zero_grad()
        ((decoder(z) - surface(z)) ** 2).sum(1).mean().backward()
        opt.step()
    decoder.eval()

    t0 = time.perf_counter()
    metric = fxjac.jtmjp(decoder, wrt="input")                 # p(z) -> (x, JᵀJ): [B, 2, 2]
    axis = torch.linspace(-1, 1, grid_n)
    zz = torch.cartesian_prod(axis, axis)
    _, G = metric(zz)
    bg_axis = torch.linspace(-1.1, 1.1, bg_n)
    bz = torch.cartesian_prod(bg_axis, bg_axis)
    _, G_bg = metric(bz)                                        # a new batch size: no rebuild
    elapsed = time.perf_counter() - t0
    magnification = torch.linalg.det(G_bg).clamp_min(0).sqrt().reshape(bg_n, bg_n)

    fig, ax = plt.subplots(figsize=(7, 6), constrained_layout=True)
    im = ax.imshow(magnification.T, origin="lower", extent=(-1.1, 1.1, -1.1, 1.1), cmap="Blues")
    fig.colorbar(im, ax=ax, label="magnification factor sqrt(det G)")
    lam, vec = torch.linalg.eigh(G)
    scale = 0.6 * (2 / (grid_n - 1)) * lam.sqrt().min()  # the smallest stretch fills about one grid cell
    for z, lam_z, v in zip(zz, lam, vec):
        w, h = (scale / lam_z.clamp_min(1e-12).sqrt()).clamp(max=0.25).tolist()
        angle = math.degrees(math.atan2(v[1, 0], v[0, 0]))
        ax.add_patch(Ellipse(z.tolist(), 2 * w, 2 * h, angle=angle, fill=False, color="#c0392b", lw=1))
    ax.set_xlim(-1.1, 1.1)
    ax.set_ylim(-1.1, 1.1)
    ax.set_xlabel("z₁")
    ax.set_ylabel("z₂")
    ax.set_title("pull-back metric JᵀJ of a decoder: unit-distance ellipses")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "pullback_metric.png"
    fig.savefig(path, dpi=90)
    print(f"JᵀJ at {zz.shape[0] + bz.shape[0]} latent points in {elapsed:.3f} s; "
          f"magnification from {magnification.min():.2f} to {magnification.max():.2f}")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
