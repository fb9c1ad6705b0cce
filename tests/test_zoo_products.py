"""Every product on every zoo model, against torch.func references (float64, relative error < 1e-10)."""

import pytest
import torch
from reference import check_direction_products, check_metric_products

import fxjac.zoo as zoo

NAMES = zoo.names()


def last_layer(model):
    """The module prefix of the last module owning parameters (a last-layer subset for ``wrt``)."""
    name = [n for n, p in model.named_parameters() if p.requires_grad][-1]
    return name.rsplit(".", 1)[0]


@pytest.mark.parametrize("batch", [1, 7])
@pytest.mark.parametrize("name", NAMES)
def test_direction_products(name, batch):
    model, _ = zoo.build(name)
    xs = zoo.example_inputs(name, batch)
    check_direction_products(model, xs)


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
    xs = zoo.example_inputs(name, 3)
    check_metric_products(model, xs)


@pytest.mark.parametrize("name", NAMES)
def test_metric_products_last_layer_batch1(name):
    model, _ = zoo.build(name)
    xs = zoo.example_inputs(name, 1)
    check_metric_products(model, xs, names=[last_layer(model)], matrices=("identity", "diag", "full"))
