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
        if not (isinstance(class_dim, int) and not isinstance(class_dim, bool) and class_dim == 1):
            raise OptionError(f"class_dim= is the cross-entropy's class axis; loss={loss!r} takes none (it would be "
                              "ignored)")
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
    ``sample_shape``, broadcastable to one sample of the output with as many axes (or one value).
    """
    if isinstance(sigma, (int, float)) and not isinstance(sigma, bool):
        t = torch.tensor(float(sigma), dtype=torch.float64)
    else:
        try:
            t = torch.as_tensor(sigma).detach()
            if t.is_complex():
                raise TypeError("complex")  # (a cast would drop the imaginary part)
            t = t.to("cpu", torch.float64)
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
            why = "has more axes than" if t.dim() > len(shape) else "does not broadcast to"
            raise OptionError(f"sigma of shape {tuple(t.shape)} {why} one output sample, {shape}")
        if 0 < t.dim() < len(shape) and t.numel() > 1:  # broadcasting would align it with the last axes
            raise OptionError(f"sigma of shape {tuple(t.shape)} has fewer axes than one output sample, {shape}: "
                              "give it every axis, with 1 where it is shared (C values per channel of [C, H, W] "
                              "are [C, 1, 1]), so that it cannot meet the wrong one")
    return t.item() if t.dim() == 0 else t.tolist()


# Note [confident predictions]
# ~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
# A confident classifier puts p ≈ 1 on one class: 1 − p computed as such cancels (in float32 it is 0 once the
# logit gap passes about 17, where the curvature is e^−gap), and so does every form that subtracts from the
# winning class's probability (the Householder square root pivoted on another class: 18 % off at a gap of 30 in
# float32). So 1 − p of the winning class is the sum of the others, the sigmoid's s (1 − s) is σ(y) σ(−y), the
# Householder reflection pivots on the winning class of each sample and position, and the Hessian-vector product
# subtracts the winning class's entry first (H 1 = 0). √p is exp(½ log p): its derivative stays finite where p
# underflows to 0 (differentiable=True).


def _winner(p, dim):
    """A boolean mask of each position's largest entry along ``dim`` (one per position)."""
    return torch.zeros_like(p, dtype=torch.bool).scatter_(dim, p.argmax(dim, keepdim=True), True)


def softmax_complement(p, dim):
    """``1 − p`` for probabilities ``p`` along ``dim``, the largest as the sum of the others (Note [confident
    predictions]).
    """
    top = _winner(p, dim)
    return torch.where(top, p.masked_fill(top, 0).sum(dim, keepdim=True), 1 - p)


def _diag(y, loss, class_dim, sigma):
    if loss == "mse":
        return torch.ones_like(y)
    if loss == "cross_entropy":
        p = torch.softmax(y, class_dim)
        return p * softmax_complement(p, class_dim)
    if loss == "bce":
        return torch.sigmoid(y) * torch.sigmoid(-y)
    if loss == "gaussian":
        sig = torch.as_tensor(sigma, dtype=y.dtype, device=y.device)
        return (1.0 / (sig * sig)).expand(y.shape[1:]).expand_as(y).clone()
    # gaussian_nll: [B, 2, ...] = (mean, log-variance); the Fisher is diag(1/var, 1/2).
    inv_var = torch.exp(-y[:, 1:2])
    return torch.cat([inv_var, torch.full_like(inv_var, 0.5)], dim=1)


def cross_entropy_columns(y, class_dim):
    """Columns of a square root of the softmax Hessian ``H = diag(p) − p pᵀ`` at every position: ``C − 1`` of them.

    ``H`` has rank ``C − 1`` (``H 1 = 0``), so ``C`` columns waste one: with ``q = √p``, ``H = D (I − q qᵀ) D``
    for ``D = diag(q)``, and the Householder reflection ``I − u uᵀ / (1 + q_L)``, ``u = q + e_L``, maps ``q`` to
    ``−e_L``; its other ``C − 1`` columns are an orthonormal basis of ``q``'s complement. Column ``j ≠ L`` of the
    factor is then ``q_j (e_j − r)`` with ``r = (p + q_L e_L) / (1 + q_L)`` (no division by less than 1). ``L``
    is each sample's (and position's) most probable class, where nothing cancels (Note [confident predictions]):
    column ``k`` is class ``k``, or ``k + 1`` from ``L`` on. One class keeps its single (zero) column.

    Returns ``[K * S, *y.shape]`` for ``S`` positions besides the class axis and ``K = C − 1`` (one column per
    factor column and position, supported on that position only).
    """
    class_dim = class_dim % y.dim()  # the stack's axes are y's plus one in front: count from the front
    yt = y.movedim(class_dim, 1)
    b, c = yt.shape[0], yt.shape[1]
    spatial = tuple(yt.shape[2:])
    log_p = torch.log_softmax(yt, 1).reshape(b, c, math.prod(yt.shape[2:]))  # [B, C, S]
    p, q = log_p.exp(), (0.5 * log_p).exp()
    s = p.shape[2]
    if c > 1:
        top = p.argmax(1, keepdim=True)  # [B, 1, S]
        q_top = q.gather(1, top)
        r = (p + q_top * (torch.arange(c, device=y.device)[:, None] == top)) / (1 + q_top)
        # class of column k: k below the pivot, k + 1 from it on
        j = torch.arange(c - 1, device=y.device)[:, None, None, None]  # [K, 1, 1, 1]
        j = j + (j >= top.unsqueeze(0)).long()  # [K, B, 1, S]
        q = q.unsqueeze(0).expand(c - 1, -1, -1, -1).gather(2, j)  # [K, B, 1, S]
        cols = q * ((torch.arange(c, device=y.device)[:, None] == j).to(y.dtype) - r.unsqueeze(0))  # [K, B, C, S]
    else:
        cols = q.unsqueeze(0) * (1 - p).unsqueeze(0)  # the one class: a zero column
    k = cols.shape[0]
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
    if loss == "cross_entropy":  # H t = H (t − t_L 1), L the winning class (Note [confident predictions])
        dim = class_dim % y.dim() + 1  # the stack's axis
        p = torch.softmax(y, class_dim)
        top = p.argmax(class_dim, keepdim=True).unsqueeze(0)
        u = t - t.gather(dim, top.expand((t.shape[0],) + tuple(top.shape[1:])))
        return p * u - p * (p * u).sum(dim, keepdim=True)
    return _diag(y, loss, class_dim, sigma) * t
