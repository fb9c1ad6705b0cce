"""The ``fxjac`` command: the demo's quick mode checks every product and exits 0; errors are one line."""

import subprocess
import sys


def run(*args):
    return subprocess.run([sys.executable, "-m", "fxjac", *args], capture_output=True, text=True, timeout=600)


def test_demo_quick_checks_every_product():
    r = run("demo", "--quick", "--models", "mlp,two_input,shape_arith")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "0 wrong" in r.stdout
    assert r.stdout.count(" yes") >= 30


def test_version_and_bad_model():
    assert "fxjac" in run("--version").stdout
    r = run("demo", "--models", "nonet")
    assert r.returncode == 2 and "unknown model" in r.stderr and "Traceback" not in r.stderr
