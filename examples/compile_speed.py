"""Eager vs torch.compile: the same fxjac product, timed both ways at two batch sizes.

A product is a GraphModule of plain tensor ops, so torch.compile(product, fullgraph=True, dynamic=True) takes it
whole (fxjac.compile(model, name, backend=...) is the one-liner); the batch size may change between calls
without recompiling. Here: per-sample gradients (vjp, reduce="none") of a CNN (with --all, its GGN diagonal too).

    python examples/compile_speed.py [--quick] [--all] [--backend inductor] [--out DIR]
"""

import argparse
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

import fxjac  # noqa: E402
from fxjac.zoo import CNN  # noqa: E402


def median_time(fn, repeat):
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a tiny model, the aot_eager backend (for CI)")
    parser.add_argument("--backend", default=None, help="torch.compile backend (default: inductor; "
                        "aot_eager with --quick, which checks the graph compiles but does not speed it up)")
    parser.add_argument("--all", action="store_true", help="also time the GGN diagonal (another minute)")
    parser.add_argument("--out", default="fxjac-examples", help="folder for the picture")
    args = parser.parse_args()
    backend = args.backend or ("aot_eager" if args.quick else "inductor")
    torch.manual_seed(0)
    # Batch sizes unlike every other size of the model (torch.compile's duck sizing would tie a batch of 16 to
    # 16x16 images and specialise it), on one side of 16: torch's own convolution shape function guards on
    # "batch < 16", so crossing 16 recompiles once whatever the product.
    size, width, batches, repeat = (8, 4, (5, 7), 3) if args.quick else (16, 8, (20, 28), 10)
    model = CNN(in_ch=3, size=size, classes=10, width=width).eval()
    cases = {
        "per-sample grads": (lambda: fxjac.vjp(model, wrt="params", reduce="none"), lambda b: (torch.randn(b, 10),)),
        "GGN diagonal": (lambda: fxjac.ggn(model, loss="cross_entropy", out="diag"), lambda b: ()),
    }
    if not args.all:
        cases.pop("GGN diagonal")
    rows = []
    for name, (build, operands) in cases.items():
        product = build()
        compiled = torch.compile(product, backend=backend, fullgraph=True, dynamic=True)
        for i, b in enumerate(batches):
            x = torch.randn(b, 3, size, size)
            ops = operands(b)
            product(x, *ops)  # the first eager call builds the product and checks it against the model
            t = time.perf_counter()
            got = compiled(x, *ops)[1]
            first = time.perf_counter() - t
            err = (got - product(x, *ops)[1]).abs().max().item()
            t_eager = median_time(lambda: product(x, *ops), repeat)
            t_comp = median_time(lambda: compiled(x, *ops), repeat)
            rows.append((name, b, t_eager, t_comp, first, err))
            what = "compile" if i == 0 else "first call at a new batch size (no recompilation)"
            print(f"{name:<17} B={b:<3} eager {t_eager * 1e3:8.2f} ms   {backend} {t_comp * 1e3:8.2f} ms   "
                  f"{what}: {first:.2f} s   max |diff| {err:.1e}")

    fig, ax = plt.subplots(figsize=(8, 4), constrained_layout=True)
    labels = [f"{n}\nB={b}" for n, b, *_ in rows]
    pos = torch.arange(len(rows)).float()
    ax.bar(pos - 0.2, [r[2] * 1e3 for r in rows], 0.4, label="eager", color="#4c72b0")
    ax.bar(pos + 0.2, [r[3] * 1e3 for r in rows], 0.4, label=f"torch.compile ({backend})", color="#dd8452")
    ax.set_xticks(pos.tolist(), labels)
    ax.set_ylabel("median time per call (ms)")
    ax.set_title(f"fxjac products of a CNN ({size}x{size}), eager vs torch.compile")
    ax.legend()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "compile_speed.png"
    fig.savefig(path, dpi=90)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
