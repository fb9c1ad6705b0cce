"""Every product on every zoo model, against torch.func references (float64, relative error < 1e-10)."""

import pytest
import torch
from reference import check_direction_products, check_metric_products

import fxjac.zoo as zoo

NAMES = zoo.names()
# Convolutional nets in float64 run on slow kernels here: their heaviest checks use fewer combinations (each
# product kind is still checked on them, and every combination on the other models).
HEAVY = {"resnet", "unet"}


def last_layer(model):
    """The module prefix of the last module owning parameters (a last-layer subset for ``wrt``)."""
    name = [n for n, p in model.named_parameters() if p.requires_grad][-1]
    return name.rsplit(".", 1)[0]


@pytest.mark.parametrize("batch", [1, 7])
@pytest.mark.parametrize("name", NAMES)
def test_direction_products(name, batch):
    model, _ = zoo.build(name)
    xs = zoo.example_inputs(name, batch)
    heavy = name in HEAVY and batch > 1
    check_direction_products(model, xs, products=("jvp", "vjp", "mjp") if heavy else None)


@pytest.mark.parametrize("name", NAMES)
def test_direction_products_last_layer(name):
    model, _ = zoo.build(name)
    xs = zoo.example_inputs(name, 3)
    check_direction_products(model, xs, names=[last_layer(model)], products=("jvp", "vjp", "jacobian"))


@pytest.mark.parametrize("name", NAMES)
def test_direction_products_float32(name):
    model, _ = zoo.build(name, dtype=torch.float32)
    xs = zoo.example_inputs(name, 3, dtype=torch.float32)
    check_direction_products(model, xs, dtype=torch.float32, products=("jvp", "vjp", "jmp"))


@pytest.mark.parametrize("name", NAMES)
def test_metric_products(name):
    model, _ = zoo.build(name)
    xs = zoo.example_inputs(name, 2 if name in HEAVY else 3)
    check_metric_products(model, xs, matrices=("diag", "sqrt") if name in HEAVY else None)


@pytest.mark.parametrize("name", NAMES)
def test_metric_products_last_layer_batch1(name):
    model, _ = zoo.build(name)
    xs = zoo.example_inputs(name, 1)
    check_metric_products(model, xs, names=[last_layer(model)],
                          matrices=("identity",) if name in HEAVY else ("identity", "diag", "full"),
                          wrts=("params",))


@pytest.mark.parametrize("name", ["mlp", "cnn", "transformer_mha", "two_input"])
def test_metric_products_float32(name):
    model, _ = zoo.build(name, dtype=torch.float32)
    xs = zoo.example_inputs(name, 3, dtype=torch.float32)
    check_metric_products(model, xs, dtype=torch.float32, matrices=("identity", "diag"))
