"""fxjac.draw and `fxjac draw`: what the pictures say (read from the DOT source), formats, collapsing, errors."""

import re

import pytest
import torch
import torch.nn as nn

import fxjac
from fxjac import zoo
from fxjac.cli import main
from fxjac.draw import FILL


def _edge_labels(source):
    return [a or b for a, b in re.findall(r'label=(?:"([^"]*)"|(\w+))', source)]


@pytest.fixture(scope="module")
def resnet():
    model, _ = zoo.build("resnet", dtype=torch.float32)
    return model, zoo.example_inputs("resnet", 2, dtype=torch.float32)


def test_resnet_metric_product_svg(resnet, tmp_path):
    model, xs = resnet
    out = tmp_path / "resnet.svg"
    g = fxjac.draw(model, out, product="jtmjp", wrt="params", out="diag", example_inputs=xs)
    assert out.read_text().lstrip().startswith(("<?xml", "<svg"))
    src = g.source
    labels = _edge_labels(src)
    # Primal tensors with their shapes, the cotangent factor columns as stacks over them, the reduced diagonals.
    assert any(lb.startswith("primal\n[2, 4, 8, 8]") for lb in labels)
    assert any(lb.startswith("√M factor (cotangents)\n[K=3 | 2, 8, 4, 4]") for lb in labels)
    assert any(lb.startswith("reduced\n") for lb in labels)
    assert any(lb.startswith("primal (reused)") for lb in labels)
    # One cluster per residual block, cotangent boxes named after their op, structured rules coloured.
    assert "cluster_layers_0" in src and "cluster_layers_1" in src and 'label="layers[0]"' in src
    assert "ct conv2d_1" in src and "conv_cts" in src
    assert FILL["structured"] in src and "legend" in src


def test_resnet_fallback_ops_are_coloured(resnet):
    model, xs = resnet
    p = fxjac.vjp(model, wrt="params", example_inputs=xs, leaf_modules=[nn.BatchNorm2d])
    assert p.fallback_ops
    src = fxjac.draw(p).source  # a product: shapes from its recorded inputs
    assert FILL["fallback"] in src and "fallback_vjp" in src
    assert any(lb.startswith("cotangent vector\n[K=1 | 2, 3]") for lb in _edge_labels(src))


def test_transformer_forward_product():
    model, _ = zoo.build("transformer_explicit", dtype=torch.float32)
    xs = zoo.example_inputs("transformer_explicit", 2, dtype=torch.float32)
    g = fxjac.draw(model, product="jmp", wrt="input", example_inputs=xs, depth=2)
    src = g.source
    labels = _edge_labels(src)
    assert any(lb.startswith("tangent K-column stack\n[K=2 | 2, 5, 8]") for lb in labels)
    assert any(lb.startswith("tangent K-column stack\n[K=2 | 2, 2, 5, 5]") for lb in labels)  # attention scores
    assert any(lb == "operand" for lb in labels)
    assert "t softmax" in src and "cluster_blocks_0" in src and "cluster_blocks_0_attn" in src


def test_dot_needs_no_binary(resnet, tmp_path, monkeypatch):
    model, xs = resnet
    p = fxjac.jvp(model, wrt="input", example_inputs=xs)
    monkeypatch.setenv("PATH", str(tmp_path))  # no `dot` here
    out = tmp_path / "flow.dot"
    g = fxjac.draw(p, out)
    assert out.read_text() == g.source and out.read_text().startswith("digraph")
    with pytest.raises(RuntimeError, match="dot"):
        fxjac.draw(p, tmp_path / "flow.svg")


class Block(nn.Module):
    def __init__(self, d=4):
        super().__init__()
        self.fc = nn.Linear(d, d)

    def forward(self, x):
        return x + torch.tanh(self.fc(x))


def test_repeated_blocks_collapse():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), *[Block() for _ in range(50)], nn.Linear(4, 2)).eval()
    x = torch.randn(2, 3)
    src = fxjac.draw(net, product="ggn", example_inputs=x).source
    assert "× 48" in src and "[2] … [49]" in src
    assert "subgraph cluster_1 {" in src and "subgraph cluster_50 {" in src and "cluster_25 " not in src
    assert src.count("\n") < 400  # readable: two blocks, the boxes and the rest
    full = fxjac.draw(net, product="ggn", example_inputs=x, collapse=False).source
    assert "× 48" not in full and "subgraph cluster_25 {" in full


def test_options_are_checked(resnet):
    model, xs = resnet
    with pytest.raises(fxjac.OptionError, match="example_inputs"):
        fxjac.draw(model)
    with pytest.raises(fxjac.OptionError, match="suffix|writes"):
        fxjac.draw(model, "flow.jpg", example_inputs=xs)


def test_cli_draw(tmp_path, capsys):
    out = tmp_path / "mlp.dot"
    assert main(["draw", "fxjac.zoo:SmallMLP", "--input-shape", "3,20", "--product", "jtmjp", "-o", str(out)]) == 0
    assert "√M factor" in out.read_text()
    model_file = tmp_path / "net.py"
    model_file.write_text("import torch.nn as nn\n"
                          "class Net(nn.Module):\n"
                          "    def __init__(self):\n"
                          "        super().__init__()\n"
                          "        self.fc = nn.Linear(3, 2)\n"
                          "    def forward(self, x):\n"
                          "        return self.fc(x) if x.sum() > 0 else -self.fc(x)\n"
                          "def good():\n"
                          "    return nn.Sequential(nn.Linear(3, 2), nn.Tanh())\n")
    assert main(["draw", f"{model_file}:good", "--input-shape", "2,3", "-o", str(tmp_path / "g.dot")]) == 0
    capsys.readouterr()
    for argv, status, message in [
        ([f"{tmp_path}/missing.py:Net", "--input-shape", "2,3"], 2, "no such file"),
        (["fxjac.zoo:Nope", "--input-shape", "2,3"], 2, "no attribute"),
        (["fxjac.zoo:SmallMLP", "--input-shape", "3,2x0"], 2, "bad --input-shape"),
        ([f"{model_file}:Net", "--input-shape", "2,3", "-o", str(tmp_path / "n.dot")], 1, "TraceError"),
    ]:
        assert main(["draw", *argv]) == status
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
    with pytest.raises(fxjac.TraceError):
        main(["draw", f"{model_file}:Net", "--input-shape", "2,3", "-o", str(tmp_path / "n.dot"), "--debug"])


@pytest.mark.parametrize("out", ["diag", "full"])
def test_built_metric_product_of_linear_layers_draws_factors(out):
    # A built product is classified by the reducers it calls; an MLP's Linear weights are reduced in closed form
    # (written into the diagonal, or Kronecker blocks), with no generic Gram kernel in the graph.
    model = nn.Sequential(nn.Linear(4, 8, bias=False), nn.Tanh(), nn.Linear(8, 3, bias=False))
    p = fxjac.jtmjp(model, wrt="params", out=out, example_inputs=(torch.randn(5, 4),))
    p.ensure_built()
    assert any(lb.startswith("√M factor (cotangents)") for lb in _edge_labels(fxjac.draw(p).source))


def test_drawing_an_rnn_logs_no_error(tmp_path, caplog):
    """The shapes-only run falls back from fake to real tensors where a leaf (an LSTM) fails on fake ones:
    torch's fake-tensor log of that failure is no error of the user's."""

    class Tagger(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn, self.fc = nn.LSTM(3, 4, batch_first=True), nn.Linear(4, 2)

        def forward(self, x):
            return self.fc(self.rnn(x)[0][:, -1])

    with caplog.at_level("WARNING"):
        g = fxjac.draw(Tagger(), tmp_path / "lstm.dot", product="ggn", example_inputs=(torch.randn(2, 4, 3),))
    assert g is not None and (tmp_path / "lstm.dot").exists()
    assert not [r for r in caplog.records if r.levelname in ("ERROR", "CRITICAL")], caplog.text
