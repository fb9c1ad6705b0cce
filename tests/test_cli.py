"""The ``fxjac`` command: the demo's quick mode checks every product and exits 0; errors are one line."""

import subprocess
import sys


def run(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "fxjac", *args], capture_output=True, text=True, timeout=600, cwd=cwd)


def test_demo_checks_every_product_on_every_zoo_model(tmp_path):
    from fxjac import zoo

    r = run("demo", "--out", str(tmp_path / "pics"))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "0 wrong" in r.stdout
    assert r.stdout.count(" yes") == 10 * len(zoo.names())
    assert len(list((tmp_path / "pics").iterdir())) == len(zoo.names())


def test_version_and_bad_model():
    assert "fxjac" in run("--version").stdout
    r = run("demo", "--models", "nonet")
    assert r.returncode == 2 and "unknown model" in r.stderr and "Traceback" not in r.stderr


def test_demo_batch_must_be_positive():
    r = run("demo", "--batch", "0")
    assert r.returncode == 2 and "not positive" in r.stderr and "Traceback" not in r.stderr
