"""Smoke test of the benchmark: ``python -m benchmarks.run --quick`` runs and writes its JSON (timings not checked)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


def test_quick_benchmark_writes_json(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "benchmarks.run", "--quick", "--out", str(tmp_path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=170)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| case | task |" in proc.stdout
    latest = tmp_path / "latest-quick.json"
    assert latest.exists()
    assert len(list(tmp_path.glob("quick-*.json"))) == 1
    result = json.loads(latest.read_text())
    assert result["meta"]["mode"] == "quick" and result["meta"]["threads"] >= 1
    rows = result["rows"]
    ok = {r["contender"] for r in rows if r["status"] == "ok"}
    assert "fxjac" in ok
    assert ok & {"torch", "backpack", "curvlinops", "laplace[backpack]", "laplace[asdl]"}
    # fxjac agrees with the torch.func reference wherever both ran
    fx = [r for r in rows if r["contender"] == "fxjac" and r["status"] != "n/a"]
    assert fx and all(r["status"] == "ok" for r in fx), [(r["case"], r["task"], r["rel_err"]) for r in fx]
    assert any(r["rel_err"] is not None for r in fx)
    # every row that did not run says why
    assert all(r["reason"] for r in rows if r["status"] == "n/a")
    assert result["targets"]


def test_gpu_timing_synchronises_after_every_call():
    # On a GPU a call returns when its kernels are queued: each timed call must end with the device's sync.
    from benchmarks.run import Timing

    events = []
    t = Timing(quick=True, sync=lambda: events.append("sync"))
    out, times, _ = t.measure(lambda: events.append("call") or 7)
    assert out == 7 and len(times) >= 1
    calls = [i for i, e in enumerate(events) if e == "call"]
    assert len(calls) == len(times) + 1  # the warm-up call, then the timed ones
    assert all(events[i + 1] == "sync" for i in calls)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")
def test_device_cuda_without_cuda_is_a_usage_error():
    proc = subprocess.run([sys.executable, "-m", "benchmarks.run", "--quick", "--device", "cuda"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "sees no CUDA device" in proc.stderr
