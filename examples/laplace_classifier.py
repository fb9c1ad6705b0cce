"""Laplace approximations of a small MLP classifier on a 2-D toy problem, and the uncertainty they predict.

* a diagonal Laplace over all parameters: posterior precision = diag GGN of the cross-entropy (fxjac.ggn) + prior;
* a last-layer Laplace with the full [P_L, P_L] GGN of the last layer (fxjac.ggn(wrt=["4"], out="full"));
* the linearised predictive J Σ Jᵀ on a grid with fxjac.jmjtp (matrix="diag" and matrix="full"), turned into
  class probabilities with the probit approximation softmax(f / sqrt(1 + π/8 var)).

    python examples/laplace_classifier.py [--quick] [--out DIR]
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

import fxjac  # noqa: E402


def make_data(n, g):
    """Three Gaussian blobs on a circle."""
    classes = 3
    y = torch.randint(0, classes, (n,), generator=g)
    angle = 2 * math.pi * y.float() / classes
    centres = torch.stack([torch.cos(angle), torch.sin(angle)], 1) * 2.0
    return centres + 0.6 * torch.randn(n, 2, generator=g), y


def train(model, x, y, steps):
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model.eval()


def probit_predictive(f, var):
    return torch.softmax(f / torch.sqrt(1 + math.pi / 8 * var), dim=-1)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer points and steps (for CI)")
    parser.add_argument("--out", default="fxjac-examples", help="folder for the picture")
    args = parser.parse_args()
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    n, steps, grid_n = (150, 150, 30) if args.quick else (600, 1500, 80)
    x, y = make_data(n, g)
    model = nn.Sequential(nn.Linear(2, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 3))
    model = train(model, x, y, steps)
    prior = 1.0  # prior precision

    t0 = time.perf_counter()
    # Diagonal Laplace over every parameter.
    _, ggn_diag = fxjac.ggn(model, loss="cross_entropy", out="diag")(x, target=y)
    sigma_diag = 1.0 / (ggn_diag + prior)
    # Last-layer Laplace with the full GGN of the last Linear ("4" in the Sequential).
    _, ggn_ll = fxjac.ggn(model, loss="cross_entropy", wrt=["4"], out="full")(x, target=y)
    sigma_ll = torch.linalg.inv(ggn_ll + prior * torch.eye(ggn_ll.shape[0]))
    sigma_ll = (sigma_ll + sigma_ll.T) / 2  # symmetric to rounding, as jmjtp checks

    lim = 4.5
    axis = torch.linspace(-lim, lim, grid_n)
    gx, gy = torch.meshgrid(axis, axis, indexing="xy")
    grid = torch.stack([gx.reshape(-1), gy.reshape(-1)], 1)
    f, var_diag = fxjac.jmjtp(model, wrt="params", matrix="diag", out="diag")(grid, sigma_diag)     # [N, 3]
    _, var_ll = fxjac.jmjtp(model, wrt=["4"], matrix="full", out="diag")(grid, sigma_ll)            # [N, 3]
    elapsed = time.perf_counter() - t0

    panels = [("MAP", torch.softmax(f, -1)), ("diagonal Laplace (all parameters)", probit_predictive(f, var_diag)),
              ("last-layer Laplace (full GGN)", probit_predictive(f, var_ll))]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.6), constrained_layout=True)
    for ax, (title, prob) in zip(axes, panels):
        conf = prob.max(-1).values.reshape(grid_n, grid_n)
        im = ax.contourf(gx, gy, conf, levels=20, cmap="viridis", vmin=1 / 3, vmax=1)
        ax.scatter(x[:, 0], x[:, 1], c=y, cmap="Set1", s=8, edgecolors="k", linewidths=0.3)
        ax.set_title(title)
        ax.set_aspect("equal")
    fig.colorbar(im, ax=axes, label="confidence (max class probability)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "laplace_classifier.png"
    fig.savefig(path, dpi=90)
    print(f"P = {ggn_diag.numel()}, last layer P_L = {ggn_ll.shape[0]}; GGNs and predictive variances on "
          f"{grid.shape[0]} grid points in {elapsed:.2f} s")
    print(f"mean confidence far away (|x| > 4): MAP {panels[0][1].max(-1).values[grid.norm(dim=1) > 4].mean():.3f}, "
          f"diag {panels[1][1].max(-1).values[grid.norm(dim=1) > 4].mean():.3f}, "
          f"last layer {panels[2][1].max(-1).values[grid.norm(dim=1) > 4].mean():.3f}")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
