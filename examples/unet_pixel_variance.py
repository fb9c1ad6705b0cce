"""Per-pixel predictive variance of a small U-Net (skip concatenations, up-sampling, GroupNorm).

A diagonal Laplace posterior from the diagonal GGN of the squared error (fxjac.ggn(loss="mse")), then the
linearised predictive variance of every output pixel, diag(J Σ Jᵀ), with fxjac.jmjtp(matrix="diag", out="diag").
The task: denoise images of random discs; the test images include a square, a shape never seen in training.

    python examples/unet_pixel_variance.py [--quick] [--out DIR]
"""

import argparse
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

import fxjac  # noqa: E402
from fxjac.zoo import UNet  # noqa: E402


def discs(n, size, g):
    """Images with one or two bright discs."""
    axis = torch.arange(size).float()
    yy, xx = torch.meshgrid(axis, axis, indexing="ij")
    img = torch.zeros(n, 1, size, size)
    for _ in range(2):
        c = torch.rand(n, 2, generator=g) * size
        r = (0.12 + 0.12 * torch.rand(n, generator=g)) * size
        inside = (yy - c[:, 0, None, None]) ** 2 + (xx - c[:, 1, None, None]) ** 2 < r[:, None, None] ** 2
        img[:, 0] = torch.maximum(img[:, 0], inside.float())
    return img


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller images, fewer steps (for CI)")
    parser.add_argument("--out", default="fxjac-examples", help="folder for the picture")
    args = parser.parse_args()
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    size, n, steps = (8, 16, 30) if args.quick else (16, 48, 200)
    clean = discs(n, size, g)
    noisy = clean + 0.3 * torch.randn(clean.shape, generator=g)
    model = UNet(in_ch=1, base=4, out_ch=1)
    opt = torch.optim.Adam(model.parameters(), lr=5e-3)
    for _ in range(steps):
        opt.zero_grad()
        ((model(noisy) - clean) ** 2).mean().backward()
        opt.step()
    model.eval()

    t0 = time.perf_counter()
    noise_var = 0.05
    _, ggn = fxjac.ggn(model, loss="mse", out="diag")(noisy)          # Σ_n J_nᵀ J_n, diagonal: [P]
    sigma = 1.0 / (ggn / noise_var + 1.0)                              # posterior variance, prior precision 1
    test = discs(3, size, g)
    test[2, 0, size // 4: 3 * size // 4, size // 4: 3 * size // 4] = 1.0  # a square: out of distribution
    test_noisy = test + 0.3 * torch.randn(test.shape, generator=g)
    pred, var = fxjac.jmjtp(model, wrt="params", matrix="diag", out="diag")(test_noisy, sigma)   # [3, H*W]
    elapsed = time.perf_counter() - t0
    std = var.sqrt().reshape(3, size, size)

    fig, axes = plt.subplots(3, 3, figsize=(8, 8), constrained_layout=True)
    for i in range(3):
        for j, (img, title, cmap) in enumerate([(test_noisy[i, 0], "noisy input", "gray"),
                                                (pred[i, 0], "prediction", "gray"),
                                                (std[i], "predictive std per pixel", "magma")]):
            im = axes[i, j].imshow(img.detach(), cmap=cmap)
            axes[i, j].set_title(title if i == 0 else "")
            axes[i, j].axis("off")
            if j == 2:
                fig.colorbar(im, ax=axes[i, j], shrink=0.8)
    axes[2, 0].set_title("(a square: never seen)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "unet_pixel_variance.png"
    fig.savefig(path, dpi=80)
    print(f"U-Net with P = {ggn.numel()} parameters, {size}x{size} images: GGN diagonal over {n} images and "
          f"per-pixel variances of 3 test images in {elapsed:.2f} s")
    print(f"mean predictive std: discs {std[:2].mean():.4f}, square {std[2].mean():.4f}")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
