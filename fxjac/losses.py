"""Loss Hessians (or Fishers) w.r.t. the model output, formed inside the generated graph from ``y``.

Each loss gives, per sample, either its diagonal (shaped like ``y``) or a factorisation in the form of
Note [metric factors]: columns ``[K, *y.shape]`` and weights ``[K, B]`` (or ``None``), M = Σ_k w_k s_k s_kᵀ.
None of them depends on the target.
"""

from __future__ import annotations

import math

import torch

from .assemble import eye_stack
from .errors import OptionError

LOSSES = ("mse", "cross_entropy", "bce", "gaussian", "gaussian_nll")


def check_class_dim(loss: str, class_dim, ndim=None) -> None:
    """Refuse a cross-entropy class axis that is the batch (axis 0) or, once the output's rank is known, outside it.

    Raises:
        OptionError: naming the axis and the output's rank.
    """
    if loss != "cross_entropy":
        return
    if not isinstance(class_dim, int) or isinstance(class_dim, bool):
        raise OptionError(f"class_dim must be an int, got {class_dim!r}")
    if ndim is not None and not -ndim <= class_dim < ndim:
        raise OptionError(f"class_dim={class_dim} is outside the model output's {ndim} axes")
    if class_dim == 0 or (ndim is not None and class_dim % ndim == 0):
        raise OptionError(f"class_dim={class_dim} is the batch axis; the classes are another axis of the output "
                          "(1 for [B, C] or [B, C, H, W], -1 for [B, T, C])")


def loss_options(loss: str, class_dim, sigma, output=None):
    """Check a loss's options when the product is built (with ``output``, the model output's value, against it
    too: the class axis, ``gaussian_nll``'s ``[B, 2, ...]``, ``sigma``'s shape); returns ``sigma`` as product
    code can hold it (:func:`sigma_option`; 1.0 for the losses without one).
    """
    check_class_dim(loss, class_dim, None if output is None else output.dim())
    if output is not None and loss == "gaussian_nll" and (output.dim() < 2 or output.shape[1] != 2):
        raise OptionError(f"loss='gaussian_nll' reads the mean and log-variance on axis 1 of a [B, 2, ...] output; "
                          f"the model's output is {list(output.shape)}")
    if loss != "gaussian":
        if not (isinstance(sigma, (int, float)) and not isinstance(sigma, bool) and sigma == 1.0):
            raise OptionError(f"sigma= is the Gaussian loss's standard deviation; loss={loss!r} takes none (it would "
                              "be ignored): use loss='gaussian' for a fixed sigma")
        return 1.0
    return sigma_option(sigma, None if output is None else output.shape[1:])


def sigma_option(sigma, sample_shape=None):
    """The Gaussian loss's ``sigma`` as product code can hold it: a float, or a tensor's values as nested lists
    (generated code cannot spell a tensor). Checked when the product is built: positive, finite and, with
    ``sample_shape``, broadcastable to one sample of the output.
    """
    if isinstance(sigma, (int, float)) and not isinstance(sigma, bool):
        t = torch.tensor(float(sigma), dtype=torch.float64)
    else:
        try:
            t = torch.as_tensor(sigma).detach().to("cpu", torch.float64)
        except (TypeError, ValueError, RuntimeError) as err:
            raise OptionError(f"sigma must be a positive float or a tensor shaped like one sample, not {sigma!r}") \
                from err
    if not bool(torch.isfinite(t).all() and (t > 0).all()):
        raise OptionError("sigma (the Gaussian loss's standard deviation) must be positive and finite")
    if sample_shape is not None:
        shape = tuple(sample_shape)
        try:
            ok = torch.broadcast_shapes(t.shape, shape) == shape
        except RuntimeError:
            ok = False
        if not ok:
            raise OptionError(f"sigma of shape {tuple(t.shape)} does not broadcast to one output sample, "
                              f"{shape}")
    return t.item() if t.dim() == 0 else t.tolist()


def _diag(y, loss, class_dim, sigma):
    if loss == "mse":
        return torch.ones_like(y)
    if loss == "cross_entropy":
        p = torch.softmax(y, class_dim)
        return p * (1 - p)
    if loss == "bce":
        s = torch.sigmoid(y)
        return s * (1 - s)
    if loss == "gaussian":
        sig = torch.as_tensor(sigma, dtype=y.dtype, device=y.device)
        return (1.0 / (sig * sig)).expand(y.shape[1:]).expand_as(y).clone()
    # gaussian_nll: [B, 2, ...] = (mean, log-variance); the Fisher is diag(1/var, 1/2).
    inv_var = torch.exp(-y[:, 1:2])
    return torch.cat([inv_var, torch.full_like(inv_var, 0.5)], dim=1)


def cross_entropy_columns(y, class_dim):
    """Columns of a square root of the softmax Hessian ``H = diag(p) − p pᵀ`` at every position: ``C − 1`` of them.

    ``H`` has rank ``C − 1`` (``H 1 = 0``), so ``C`` columns waste one: with ``q = √p``, ``H = D (I − q qᵀ) D``
    for ``D = diag(q)``, and the Householder reflection ``I − u uᵀ / (1 + q_L)``, ``u = q + e_L`` (``L`` the last
    class), maps ``q`` to ``−e_L``; its other ``C − 1`` columns are an orthonormal basis of ``q``'s complement.
    Column ``j < L`` of the factor is then ``q_j (e_j − r)`` with ``r = (p + q_L e_L) / (1 + q_L)`` (no division
    by less than 1). One class keeps its single (zero) column.

    Returns ``[K * S, *y.shape]`` for ``S`` positions besides the class axis and ``K = C − 1`` (one column per
    factor column and position, supported on that position only).
    """
    class_dim = class_dim % y.dim()  # the stack's axes are y's plus one in front: count from the front
    yt = y.movedim(class_dim, 1)
    b, c = yt.shape[0], yt.shape[1]
    spatial = tuple(yt.shape[2:])
    p = torch.softmax(yt, 1).reshape(b, c, math.prod(yt.shape[2:]))  # [B, C, S]
    s = p.shape[2]
    q = p.sqrt()
    eye_c = torch.eye(c, dtype=y.dtype, device=y.device)
    if c > 1:
        q_last = q[:, -1:]  # [B, 1, S]
        r = (p + q_last * eye_c[-1][:, None]) / (1 + q_last)
        q, eye_c = q[:, :-1], eye_c[:-1]
    else:
        r = p
    k = q.shape[1]
    cols = q.permute(1, 0, 2).unsqueeze(2) * (eye_c[:, None, :, None] - r.unsqueeze(0))  # [K, B, C, S]
    if s > 1:
        eye_s = torch.eye(s, dtype=y.dtype, device=y.device)
        cols = cols.unsqueeze(1) * eye_s[None, :, None, None, :]  # [K, S, B, C, S]
    cols = cols.reshape((k * s, b, c) + spatial)
    return cols.movedim(2, class_dim + 1)


def factor_width(loss: str, y: torch.Tensor, class_dim=1) -> int:
    """Columns per sample of ``loss_factor(..., "factor")`` for an output like ``y``: one per output entry, but
    ``C − 1`` per position for the cross-entropy (:func:`cross_entropy_columns`).
    """
    n = math.prod(y.shape[1:])
    if loss == "cross_entropy":
        c = y.shape[class_dim % y.dim()]
        return n // c * (c - 1) if c > 1 else n
    return n


def loss_factor(y, loss, form, class_dim=1, sigma=1.0):
    """The loss Hessian at ``y``: its diagonal (``form="diag"``) or ``(columns, weights)`` (``"factor"``)."""
    if form == "diag":
        return _diag(y, loss, class_dim, sigma)
    n = math.prod(y.shape[1:])
    if loss == "cross_entropy":
        return cross_entropy_columns(y, class_dim), None
    if loss == "mse":
        return eye_stack(y, n), None
    d = _diag(y, loss, class_dim, sigma)
    return eye_stack(y, n), d.reshape(d.shape[0], n).t()


def loss_hvp(y, t, loss, class_dim=1, sigma=1.0):
    """The loss Hessian (Fisher for ``gaussian_nll``) at ``y`` applied to a tangent stack ``t`` ``[K, *y.shape]``."""
    if loss == "mse":
        return t
    if loss == "cross_entropy":
        p = torch.softmax(y, class_dim)
        return p * t - p * (p * t).sum(class_dim % y.dim() + 1, keepdim=True)
    return _diag(y, loss, class_dim, sigma) * t
