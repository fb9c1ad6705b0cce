"""A laplace-torch curvature backend: ``Laplace(model, ..., backend=FxJacGGN)``.

The GGN (exact diagonal or full, all weights or the last layer) and the Jacobians the GLM predictive asks for are
fxjac products, built once per structure and reused for every batch. Needs ``laplace-torch`` (installed with
``--no-deps``: see the Makefile).
"""

from __future__ import annotations

from typing import Any

import torch
from laplace.curvature import GGNInterface

from .. import direction, metric


class FxJacGGN(GGNInterface):
    """laplace-torch's ``GGNInterface`` computed by fxjac: exact diagonal and full GGN, Jacobians for ``glm``.

    Stochastic (Monte-Carlo Fisher) and sub-network variants fall back to laplace-torch's own torch.func code.
    """

    def __init__(self, model, likelihood, last_layer: bool = False, subnetwork_indices=None,
                 leaf_modules=(), concrete_args=None, **kwargs: Any):
        """``leaf_modules`` and ``concrete_args`` are fxjac's tracing options for every product (through
        ``Laplace(..., backend_kwargs={"leaf_modules": [...]})``); the rest is laplace-torch's.
        """
        super().__init__(model, likelihood, last_layer, subnetwork_indices, **kwargs)
        self._products: dict = {}
        self._options = {"leaf_modules": list(leaf_modules), "concrete_args": concrete_args}

    # --- products, built once per structure ---------------------------------------------------------------
    def _loss(self) -> str:
        return "cross_entropy" if self.likelihood == "classification" else "mse"

    def _net(self):
        return self.model.last_layer if self.last_layer else self.model

    def _product(self, key: str, make, x):
        """The product ``make(net, **options)`` for inputs like ``x``: one per network and sample shape (a
        product is built for one; a CNN with adaptive pooling may be fitted and asked at other image sizes).
        """
        net = self._net()
        key = (key, tuple(x.shape[1:]), x.dtype, x.device)
        cached = self._products.get(key)
        if cached is None or cached[0] is not net:
            self._products[key] = (net, make(net, **self._options))
        return self._products[key][1]

    def _inputs(self, x):
        """The tensor the differentiated network takes: the last layer's features, or ``x`` itself."""
        if self.last_layer:
            f, phi = self.model.forward_with_features(x)
            return f, phi
        return None, x

    def _fallback(self) -> bool:
        return self.subnetwork_indices is not None or self.stochastic

    # --- laplace-torch's interface ------------------------------------------------------------------------
    def jacobians(self, x, enable_backprop: bool = False):
        """``(Js [B, C, P], f [B, C])`` by fxjac's Jacobian product (reverse accumulation over the C outputs)."""
        if self.subnetwork_indices is not None or not isinstance(x, torch.Tensor):
            return super().jacobians(x, enable_backprop)
        p = self._product(f"jacobian_{enable_backprop}",  # a differentiable product is another product
                          lambda net, **o: direction.jacobian(net, wrt="params", mode="reverse",
                                                              differentiable=enable_backprop, **o), x)
        f, js = p(x)
        return (js, f) if enable_backprop else (js.detach(), f.detach())

    def last_layer_jacobians(self, x, enable_backprop: bool = False):
        """``(Js, f)`` w.r.t. the last layer from its input features."""
        f, phi = self.model.forward_with_features(x)
        p = self._product(f"ll_jacobian_{enable_backprop}",
                          lambda net, **o: direction.jacobian(self.model.last_layer, wrt="params", mode="reverse",
                                                              differentiable=enable_backprop, **o), phi)
        _, js = p(phi)
        return (js, f) if enable_backprop else (js.detach(), f.detach())

    def _ggn(self, x, y, out: str):
        f, inp = self._inputs(x)
        p = self._product(f"ggn_{out}", lambda net, **o: metric.ggn(net, loss=self._loss(), out=out, **o), inp)
        out_y, h = p(inp)
        f = out_y if f is None else f
        loss = self.factor * self.lossfunc(f, y)
        return loss.detach(), h.detach()

    def diag(self, x, y, **kwargs: Any):
        """``(loss, exact GGN diagonal [P])``."""
        if self._fallback() or not isinstance(x, torch.Tensor):
            return super().diag(x, y, **kwargs)
        return self._ggn(x, y, "diag")

    def kron(self, x, y, **kwargs: Any):
        """Not computed by fxjac (laplace-torch's defaults ask for it: ``hessian_structure="kron"``)."""
        raise NotImplementedError("FxJacGGN gives the exact diagonal and full GGN: use hessian_structure='diag' "
                                  "or 'full' (laplace-torch's default is 'kron')")

    def full(self, x, y, **kwargs: Any):
        """``(loss, full GGN [P, P])``."""
        if self._fallback() or not isinstance(x, torch.Tensor):
            return super().full(x, y, **kwargs)
        return self._ggn(x, y, "full")


__all__ = ["FxJacGGN"]
