"""Benchmark cases (zoo model, preset, batch, loss, tasks) and the tasks' names, floors and targets."""

from __future__ import annotations

from dataclasses import dataclass

# Task names, in table order. "forward" and "fwd_bwd" are the baselines every ratio refers to.
TASKS = (
    "forward",
    "fwd_bwd",
    "jvp_input",
    "jvp_params",
    "vjp_params",
    "per_sample_grad",
    "diag_ggn",
    "diag_ggn_backprop",
    "full_ggn",
    "ggn_vp",
    "jsjt_diag",
)

TASK_TITLES = {
    "forward": "forward",
    "fwd_bwd": "forward+backward (loss)",
    "jvp_input": "jvp (input)",
    "jvp_params": "jvp (params)",
    "vjp_params": "vjp (params, summed)",
    "per_sample_grad": "per-sample gradients",
    "diag_ggn": "exact diagonal GGN",
    "diag_ggn_backprop": "diagonal-backprop GGN",
    "full_ggn": "full GGN",
    "ggn_vp": "GGN-vector product",
    "jsjt_diag": "J Σ Jᵀ, diagonal Σ",
    "compile": "compile (trace + passes)",
}

# TARGETS.md: (vs fastest other, floor as a multiple of fwd+bwd). A target is met when either bound holds.
TARGETS = {
    "jvp_input": (0.7, 1.2),
    "jvp_params": (0.7, 1.2),
    "vjp_params": (1.1, None),
    "per_sample_grad": (0.5, 1.3),
    "diag_ggn": (0.5, None),
    "diag_ggn_backprop": (None, 2.5),
    "full_ggn": (0.5, None),
    "ggn_vp": (0.8, 2.0),
    "jsjt_diag": (0.1, 4.0),
}
MEMORY_TARGET = ("jsjt_diag", 0.2)  # peak memory of J Σ Jᵀ <= 0.2 x the best other's
COMPILE_TARGET_S = 0.5  # trace + passes of each product, absolute

_ALL = TASKS[2:]
_CLASSIFIER = _ALL
_REGRESSION = tuple(t for t in _ALL if t not in ("full_ggn", "jsjt_diag"))


@dataclass(frozen=True)
class Case:
    """One benchmark case: a zoo model at a preset and batch size, its loss, and the tasks run on it."""

    name: str
    zoo: str
    preset: str
    batch: int
    loss: str  # "cross_entropy" or "mse" (fxjac's ½‖y − t‖²)
    tasks: tuple

    def all_tasks(self) -> tuple:
        """The baselines first, then the case's tasks."""
        return ("forward", "fwd_bwd") + tuple(t for t in self.tasks if t not in ("forward", "fwd_bwd"))


_FULL_TASKS = tuple(t for t in _CLASSIFIER if t != "full_ggn")

# Cheap cases first: a run cut short by --time-limit loses the most expensive ones.
FULL_CASES = (
    Case("mlp", "mlp", "bench", 128, "cross_entropy", _FULL_TASKS),
    Case("small_mlp", "small_mlp", "bench", 64, "cross_entropy", ("full_ggn", "diag_ggn", "jsjt_diag")),
    Case("large_mlp", "large_mlp", "bench", 32, "cross_entropy",
         ("vjp_params", "per_sample_grad", "diag_ggn", "ggn_vp", "jsjt_diag")),
    Case("cnn", "cnn", "bench", 64, "cross_entropy", _FULL_TASKS),
    Case("transformer_explicit", "transformer_explicit", "bench", 16, "cross_entropy", _FULL_TASKS),
    Case("resnet", "resnet", "bench", 32, "cross_entropy", _FULL_TASKS),
    # J Σ Jᵀ is a classifier's C x C predictive covariance; the U-Net has O = 1024 outputs per sample.
    Case("unet", "unet", "bench", 16, "mse", _REGRESSION),
)

# --quick: the zoo's "small" presets and small batches, so the whole run is a smoke test of a few seconds a case.
QUICK_CASES = tuple(
    Case(c.name, c.zoo, "small" if c.zoo != "small_mlp" else "bench", 8, c.loss, c.tasks) for c in FULL_CASES
)


def cases(quick: bool) -> tuple:
    """The full or the quick case list."""
    return QUICK_CASES if quick else FULL_CASES


def get_case(name: str, quick: bool) -> Case:
    """The case called ``name`` in the full or quick list."""
    for c in cases(quick):
        if c.name == name:
            return c
    raise KeyError(f"unknown case {name!r}; one of {[c.name for c in cases(quick)]}")
