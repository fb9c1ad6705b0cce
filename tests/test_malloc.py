"""glibc's thresholds (Note [glibc's heap and column stacks] in fxjac/rules/_rt.py): the first product built for
CPU tensors keeps freed heap with the process, and the user's own settings win."""

import os
import subprocess
import sys
import textwrap

import pytest

from fxjac.rules import _rt

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GLIBC = sys.platform.startswith("linux") and (os.confstr("CS_GNU_LIBC_VERSION") or "").startswith("glibc")

# Build a product, then allocate, touch and free 64 MiB in 8 MiB tensors four times; print the page faults of
# the last three rounds and what tune_malloc reported.
_CHILD = textwrap.dedent("""
    import resource, torch, fxjac
    from fxjac.rules import _rt
    torch.set_num_threads(1)
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh())
    fxjac.vjp(net, wrt="params", example_inputs=(torch.randn(2, 3),))
    def round_():
        ts = [torch.empty(2 << 20).fill_(1.0) for _ in range(8)]
        del ts
    round_()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(3):
        round_()
    print(_rt._malloc_tuned, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
""")


def _child(**env):
    full = {k: v for k, v in os.environ.items() if not (k.startswith("MALLOC_") or k in ("GLIBC_TUNABLES",
                                                                                          "FXJAC_MALLOC"))}
    full.update(env, PYTHONPATH=ROOT)
    out = subprocess.run([sys.executable, "-c", _CHILD], capture_output=True, text=True, env=full, cwd=ROOT,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    tuned, faults = out.stdout.split()
    return tuned == "True", int(faults)


@pytest.mark.skipif(not GLIBC, reason="glibc's malloc only")
def test_freed_stacks_stay_with_the_process():
    """glibc's defaults give the 64 MiB back after each round (4 KiB pages); fxjac's thresholds keep it."""
    tuned, faults = _child()
    off, faults_off = _child(FXJAC_MALLOC="off")
    user, faults_user = _child(MALLOC_ARENA_MAX_="2")  # any glibc variable of the user's: fxjac leaves it alone
    assert (tuned, off, user) == (True, False, False)
    pages = 3 * (64 << 20) // os.sysconf("SC_PAGE_SIZE")
    # glibc's defaults return the pages and fault them in again (a third to all of them, by the heap's layout)
    assert faults_off > pages // 4 and faults_user > pages // 4
    assert faults < pages // 10


def test_choice(monkeypatch):
    """``FXJAC_MALLOC`` takes ``auto`` or ``off``; anything else warns and means ``auto``."""
    monkeypatch.setenv("FXJAC_MALLOC", "OFF")
    assert _rt._malloc_choice() == "off"
    monkeypatch.setenv("FXJAC_MALLOC", "jemalloc")
    with pytest.warns(UserWarning, match="FXJAC_MALLOC='jemalloc'"):
        assert _rt._malloc_choice() == "auto"
