"""The fxjac benchmark: ``python -m benchmarks.run [--quick] [--tasks ...] [--cases ...] [--out DIR]``.

For every case (a zoo model at a batch size) and task it times each contender that can compute the task — fxjac
eager, fxjac under ``torch.compile``, torch.func / autograd, BackPACK, curvlinops, laplace-torch — as the median
of repeated calls after a warm-up call, with ``torch.set_num_threads`` fixed; every time is also given as a ratio
to the same case's forward+backward measured in the same process. Each result is compared with the torch.func
reference (max |a − ref| / max |ref|); a result off by more than ``TOLERANCE`` is marked WRONG and never counts
as the fastest. Peak memory is measured per (contender, case, task) in a fresh subprocess (resident-set growth
during one call). Prints Markdown tables and writes JSON to ``--out`` (a timestamped file and ``latest.json``;
``--quick`` writes ``quick-*.json`` and ``latest-quick.json``). ``--device cuda`` runs every contender on the GPU
(times end with ``torch.cuda.synchronize``; memory is the device's peak allocation) and tags the files ``cuda-``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import threading
import time
import traceback
import warnings
from pathlib import Path
from typing import Optional

import torch

from fxjac.rules import _rt

from . import contenders as C
from .cases import (
    COMPILE_TARGET_S,
    MEMORY_TARGET,
    TARGETS,
    TASK_TITLES,
    TASKS,
    Case,
    cases,
    get_case,
)

TOLERANCE = 1e-3  # float32: max |a − ref| / max |ref| above this is a wrong answer
ROOT = Path(__file__).resolve().parent.parent


# --- timing --------------------------------------------------------------------------------------------------


class Timing:
    """How long to measure: a warm-up call, then repeats filling ``budget_s`` (within [min_rep, max_rep]).

    A first call longer than ``slow_s`` is taken as the measurement itself (one call, no warm-up). On a GPU,
    ``sync`` (``torch.cuda.synchronize``) ends every timed call, so a time covers the kernels, not their launch.
    """

    def __init__(self, quick: bool, sync=None):
        self.budget_s, self.min_rep, self.max_rep, self.slow_s = (
            (0.05, 1, 3, 0.5) if quick else (0.5, 3, 7, 2.0))
        self.sync = sync or (lambda: None)

    def measure(self, fn):
        self.sync()
        t0 = time.perf_counter()
        out = fn()
        self.sync()
        first = time.perf_counter() - t0
        if first > self.slow_s:
            return out, [first], "1 call (first call > %.1f s, no warm-up)" % self.slow_s
        n = max(self.min_rep, min(self.max_rep, int(self.budget_s / max(first, 1e-6))))
        times = []
        for _ in range(n):
            t0 = time.perf_counter()
            fn()
            self.sync()
            times.append(time.perf_counter() - t0)
        return out, times, ""


def rel_err(out, ref) -> Optional[float]:
    if out is None or ref is None:
        return None
    if out.numel() != ref.numel():
        return float("inf")
    out = out.reshape(ref.shape).to(torch.float64)
    ref = ref.to(torch.float64)
    scale = ref.abs().max().item()
    return (out - ref).abs().max().item() / max(scale, 1e-30)


def _reason(err: BaseException) -> str:
    msg = str(err).strip().splitlines()[0] if str(err).strip() else ""
    return f"error: {type(err).__name__}: {msg[:160]}"


# --- one case ------------------------------------------------------------------------------------------------


def _contenders(args, case: Case) -> list:
    names = [c for c in C.CONTENDERS if not args.contenders or c in args.contenders]
    # torch first: it is the reference the others are checked against.
    return sorted(names, key=lambda c: c != "torch")


def run_case(case: Case, args, timing: Timing, state: dict) -> list:
    t_case = time.perf_counter()
    rows = []
    fx_setups = {}
    ctx = C.Ctx(case, device=args.device)
    tasks = [t for t in case.all_tasks() if t in ("forward", "fwd_bwd") or not args.tasks or t in args.tasks]
    print(f"## {case.name} ({case.zoo}, preset {case.preset}, batch {case.batch}, P = {ctx.P:,}, "
          f"C = {ctx.C}, loss {case.loss})", file=sys.stderr, flush=True)
    for task in tasks:
        ref = None
        for name in _contenders(args, case):
            row = {"case": case.name, "task": task, "contender": name, "status": "n/a", "reason": "",
                   "method": "", "note": "", "time_s": None, "times_s": [], "ratio_fwd_bwd": None,
                   "rel_err": None, "build_s": None, "compile_s": None, "peak_mib": None}
            if name == "fxjac+compile" and task not in ("forward", "fwd_bwd"):
                why = _compile_skip(case, args, state)
                if why:
                    row["reason"] = why
                    rows.append(row)
                    continue
            if time.perf_counter() - state["t0"] > args.time_limit and task not in ("forward", "fwd_bwd"):
                row["reason"] = f"skipped: the run passed --time-limit ({args.time_limit:.0f} s)"
                rows.append(row)
                continue
            t_setup = time.perf_counter()
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    s = C.setup(name, ctx, task, backend=args.compile_backend)
                    out, times, how = timing.measure(s.fn)
            except C.NotApplicable as err:
                row["reason"] = str(err)
                rows.append(row)
                continue
            except Exception as err:  # noqa: BLE001 - a contender that fails is reported, not fatal
                row["reason"] = _reason(err)
                if args.verbose:
                    traceback.print_exc()
                rows.append(row)
                continue
            finally:
                if name == "fxjac+compile":
                    state["compile_spent"] += time.perf_counter() - t_setup
            row.update(status="ok", method=s.method, note="; ".join(x for x in (s.note, how) if x),
                       time_s=statistics.median(times), times_s=times, build_s=s.build_s, compile_s=s.compile_s)
            if name == "fxjac":
                fx_setups[task] = s
            if name == "torch":
                ref = out
            elif task not in ("forward", "fwd_bwd", "diag_ggn_backprop"):
                row["rel_err"] = rel_err(out, ref)
                if row["rel_err"] is not None and not row["rel_err"] <= TOLERANCE:
                    row["status"] = "WRONG"
            rows.append(row)
            print(f"  {task:<18} {name:<18} {row['time_s'] * 1e3:10.3f} ms"
                  + (f"  err {row['rel_err']:.1e}" if row["rel_err"] is not None else "")
                  + (f"  {row['status']}" if row["status"] != "ok" else ""), file=sys.stderr, flush=True)
            del out, s
        del ref
        if task == "fwd_bwd":
            state["fwd_bwd_first"] = _time_of(rows, case.name, "fwd_bwd", "torch")
    # forward+backward again at the end: the ratio uses the faster of the two (load drifts on a shared machine).
    fb = state.pop("fwd_bwd_first", None)
    try:
        s = C.setup("torch", ctx, "fwd_bwd")
        _, times, _ = timing.measure(s.fn)
        again = statistics.median(times)
        fb = again if fb is None else min(fb, again)
    except Exception:  # noqa: BLE001
        pass
    for row in rows:
        if row["time_s"] is not None and fb:
            row["ratio_fwd_bwd"] = row["time_s"] / fb
    if args.profile:
        for t in _missed(rows, case.name):
            if t in fx_setups:
                state["profiles"][f"{case.name}/{t}"] = profile_fxjac(
                    fx_setups[t], _time_of(rows, case.name, t, "fxjac"), device=args.device)
    del ctx, fx_setups
    gc.collect()
    print(f"  ({case.name}: {time.perf_counter() - t_case:.1f} s)", file=sys.stderr, flush=True)
    return rows


def _compile_skip(case: Case, args, state) -> str:
    if case.name not in args.compile_cases:
        return (f"torch.compile measured on {', '.join(args.compile_cases) or 'no case'} only "
                "(--compile-cases; an inductor compile takes seconds per product on this machine)")
    if state["compile_spent"] > args.compile_budget:
        return f"compile budget of {args.compile_budget:.0f} s spent (--compile-budget)"
    return ""


def _time_of(rows, case, task, contender):
    for r in rows:
        if (r["case"], r["task"], r["contender"]) == (case, task, contender) and r["status"] == "ok":
            return r["time_s"]
    return None


# --- targets -------------------------------------------------------------------------------------------------


def evaluate_targets(rows: list) -> list:
    """TARGETS.md, per (case, task): fxjac eager vs the fastest correct other, or vs the fwd+bwd floor."""
    out = []
    for case in dict.fromkeys(r["case"] for r in rows):
        for task, (vs_best, floor) in TARGETS.items():
            fx = next((r for r in rows if (r["case"], r["task"], r["contender"]) == (case, task, "fxjac")), None)
            if fx is None:
                continue
            others = [r for r in rows if r["case"] == case and r["task"] == task and r["contender"] in C.OTHERS
                      and r["status"] == "ok"]
            best = min(others, key=lambda r: r["time_s"]) if others else None
            t = {"case": case, "task": task, "fxjac_s": fx["time_s"], "fxjac_status": fx["status"],
                 "best_other": best["contender"] if best else None, "best_other_s": best["time_s"] if best else None,
                 "vs_best": None, "vs_fwd_bwd": fx["ratio_fwd_bwd"], "target_vs_best": vs_best,
                 "target_floor": floor, "met": None}
            if fx["status"] != "ok":
                t["met"] = False
            else:
                if best is not None:
                    t["vs_best"] = fx["time_s"] / best["time_s"]
                ok_best = vs_best is not None and t["vs_best"] is not None and t["vs_best"] <= vs_best
                ok_floor = floor is not None and t["vs_fwd_bwd"] is not None and t["vs_fwd_bwd"] <= floor
                t["met"] = bool(ok_best or ok_floor)
            comp = next((r for r in rows if (r["case"], r["task"], r["contender"]) == (case, task, "fxjac+compile")
                         and r["status"] == "ok"), None)
            if comp is not None and fx["status"] == "ok":
                t["compiled_vs_eager"] = comp["time_s"] / fx["time_s"]
            out.append(t)
    return out


def evaluate_memory(rows: list) -> list:
    task, bound = MEMORY_TARGET
    out = []
    for case in dict.fromkeys(r["case"] for r in rows):
        fx = next((r for r in rows if (r["case"], r["task"], r["contender"]) == (case, task, "fxjac")), None)
        if fx is None or fx.get("peak_mib") is None:
            continue
        others = [r for r in rows if r["case"] == case and r["task"] == task and r["contender"] in C.OTHERS
                  and r["status"] == "ok" and r.get("peak_mib") is not None]
        if not others:
            continue
        best = min(others, key=lambda r: r["peak_mib"])
        ratio = fx["peak_mib"] / max(best["peak_mib"], 1e-9)
        out.append({"case": case, "task": task, "fxjac_mib": fx["peak_mib"], "best_other": best["contender"],
                    "best_other_mib": best["peak_mib"], "ratio": ratio, "target": bound, "met": ratio <= bound})
    return out


def _missed(rows, case) -> list:
    return [t["task"] for t in evaluate_targets([r for r in rows if r["case"] == case]) if t["met"] is False]


def profile_fxjac(s: "C.Setup", t_call: Optional[float], top: int = 8, device: str = "cpu") -> list:
    """torch.profiler on one call of fxjac's generated GraphModule(s) (already warm): the top ops by self time
    (CPU time; on a GPU, kernel time)."""
    from torch.profiler import ProfilerActivity, profile

    gpu = device == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if gpu else [])

    if t_call is not None and t_call > 20:
        return [{"error": f"not profiled: one call takes {t_call:.0f} s"}]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with profile(activities=activities) as prof:
                t0 = time.perf_counter()
                s.fn()
                if gpu:
                    torch.cuda.synchronize()
                wall = time.perf_counter() - t0
    except Exception as err:  # noqa: BLE001
        return [{"error": _reason(err)}]
    def self_us(e):
        return e.self_device_time_total if gpu else e.self_cpu_time_total

    averages = prof.key_averages()
    # On a GPU the kernels themselves (an aten op's device time is its kernels': counted once, as kernels).
    events = [e for e in averages if not gpu or str(e.device_type).endswith("CUDA")]
    events.sort(key=self_us, reverse=True)
    total = sum(self_us(e) for e in events) or 1.0
    summary = {"summary": True, "wall_ms": wall * 1e3, "aten_self_ms": total / 1e3,
               "aten_calls": sum(e.count for e in averages if e.key.startswith("aten::"))}
    return [summary] + [{"op": e.key, "self_ms": self_us(e) / 1e3, "share": self_us(e) / total,
                         "calls": e.count} for e in events[:top]]


# --- memory (fresh subprocesses) -----------------------------------------------------------------------------


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _maxrss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def memory_child(args) -> int:
    """In a fresh process: set up one contender, call it once (warm-up), then the resident-set growth during a
    second call (MiB), sampled every 0.5 ms and from ``getrusage``'s max RSS. The parent starts this process with
    ``MALLOC_MMAP_THRESHOLD_=65536``, so glibc returns every freed tensor to the system and the warm-up call's
    freed memory cannot hide the second call's. On a GPU: the peak of device memory allocated by PyTorch during
    the second call, above what was allocated before it.
    """
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    case = get_case(args.case, args.quick)
    ctx = C.Ctx(case, device=args.device)
    result = {"peak_mib": None, "reason": ""}
    try:
        s = C.setup(args.contender, ctx, args.task, backend=args.compile_backend)
        s.fn()
        gc.collect()
        if args.device == "cuda":
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            s.fn()
            torch.cuda.synchronize()
            result["peak_mib"] = max(0, torch.cuda.max_memory_allocated() - base) / 2**20
            print("MEMORY " + json.dumps(result), flush=True)
            return 0
        base, max_before = _rss(), _maxrss()
        peak = [base]
        done = threading.Event()

        def sample():
            while not done.is_set():
                peak[0] = max(peak[0], _rss())
                time.sleep(0.0005)

        th = threading.Thread(target=sample, daemon=True)
        th.start()
        s.fn()
        done.set()
        th.join()
        max_after = _maxrss()
        top = max(peak[0], max_after if max_after > max_before else 0)
        result["peak_mib"] = max(0, top - base) / 2**20
    except C.NotApplicable as err:
        result["reason"] = str(err)
    except Exception as err:  # noqa: BLE001
        result["reason"] = _reason(err)
    print("MEMORY " + json.dumps(result), flush=True)
    return 0


def measure_memory(rows: list, args, state: dict) -> None:
    todo = [r for r in rows if r["status"] in ("ok", "WRONG") and r["case"] in args.memory_cases
            and r["task"] in args.memory_tasks and r["contender"] != "fxjac+compile"]
    for r in todo:
        if time.perf_counter() - state["t0"] > args.time_limit:
            r["note"] = "; ".join(x for x in (r["note"], "memory not measured: --time-limit passed") if x)
            continue
        cmd = [sys.executable, "-m", "benchmarks.run", "--memory-child", "--case", r["case"], "--task", r["task"],
               "--contender", r["contender"], "--threads", str(args.threads), "--device", args.device] + (
                   ["--quick"] if args.quick else [])
        try:
            env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
            proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
            line = [x for x in proc.stdout.splitlines() if x.startswith("MEMORY ")]
            res = json.loads(line[-1][7:]) if line else {"peak_mib": None, "reason": proc.stderr[-200:]}
        except subprocess.TimeoutExpired:
            res = {"peak_mib": None, "reason": "timed out"}
        r["peak_mib"] = res["peak_mib"]
        if res.get("reason"):
            r["note"] = "; ".join(x for x in (r["note"], "memory: " + res["reason"]) if x)
        print(f"  memory {r['case']:<12} {r['task']:<16} {r['contender']:<18} "
              f"{'%.1f MiB' % r['peak_mib'] if r['peak_mib'] is not None else res.get('reason')}",
              file=sys.stderr, flush=True)


# --- output --------------------------------------------------------------------------------------------------


def _ms(t):
    if t is None:
        return "—"
    t *= 1e3
    return f"{t:.3g}" if t < 100 else f"{t:,.0f}"


def _cell(r) -> str:
    if r is None or r["status"] == "n/a":
        return "—"
    s = f"{_ms(r['time_s'])} ms"
    if r["ratio_fwd_bwd"] is not None:
        s += f" · {r['ratio_fwd_bwd']:.2g}×"
    if r["rel_err"] is not None:
        s += f" · {r['rel_err']:.0e}"
    if r["status"] == "WRONG":
        s += " **WRONG**"
    return s


def markdown(result: dict) -> str:
    rows, meta = result["rows"], result["meta"]
    used = [c for c in C.CONTENDERS if any(r["contender"] == c and r["status"] != "n/a" for r in rows)]
    gpu = meta.get("device", "cpu") != "cpu"  # results saved before --device existed are CPU runs
    where = f"{meta['gpu']} (CPU: {meta['cpu']})" if gpu else f"{meta['threads']} thread(s), {meta['cpu']}"
    malloc = f", glibc malloc: {meta['malloc']}" if meta.get("malloc") else ""
    lines = [f"fxjac benchmark ({meta['mode']}): {meta['date']}, torch {meta['torch']}, {where}{malloc}", ""]
    if meta.get("amended"):
        lines += [f"Amended after the run: {meta['amended']}", ""]
    lines += [
             "Each cell: median time · ratio to the case's forward+backward · max relative difference to the "
             "torch.func reference. — : not applicable (reasons below).", "",
             "| case | task | " + " | ".join(used) + " |", "|---|---|" + "---|" * len(used)]
    for case in dict.fromkeys(r["case"] for r in rows):
        for task in TASKS:
            rs = {r["contender"]: r for r in rows if r["case"] == case and r["task"] == task}
            if not rs or all(r["status"] == "n/a" for r in rs.values()):
                continue
            lines.append(f"| {case} | {TASK_TITLES[task]} | " + " | ".join(_cell(rs.get(c)) for c in used) + " |")
    targets = result["targets"]
    if targets:
        lines += ["", "Targets (TARGETS.md; met when either bound holds; fxjac eager):", "",
                  "| case | task | fxjac | fastest other | fxjac / fastest | target | fxjac / fwd+bwd | floor | met |"
                  " compiled / eager |", "|---|---|---|---|---|---|---|---|---|---|"]
        for t in targets:
            lines.append(
                f"| {t['case']} | {TASK_TITLES[t['task']]} | {_ms(t['fxjac_s'])} ms | "
                f"{t['best_other'] or '—'} {_ms(t['best_other_s']) + ' ms' if t['best_other_s'] else ''} | "
                f"{_f(t['vs_best'])} | {_f(t['target_vs_best'], '≤ ')} | {_f(t['vs_fwd_bwd'])} | "
                f"{_f(t['target_floor'], '≤ ')} | {'yes' if t['met'] else '**no**'} | "
                f"{_f(t.get('compiled_vs_eager'))} |")
    comp = [r for r in rows if r["contender"] in ("fxjac", "fxjac+compile") and r["status"] != "n/a"]
    if comp:
        lines += ["", f"Compile: fxjac's trace + passes per product (target ≤ {COMPILE_TARGET_S} s) and "
                  f"torch.compile's first call ({meta['compile_backend']}):", "",
                  "| case | task | trace + passes (s) | ≤ 0.5 s | torch.compile (s) |", "|---|---|---|---|---|"]
        for r in comp:
            if r["contender"] != "fxjac":
                continue
            c = next((x for x in comp if x["contender"] == "fxjac+compile" and x["case"] == r["case"]
                      and x["task"] == r["task"]), None)
            lines.append(f"| {r['case']} | {TASK_TITLES[r['task']]} | {r['build_s']:.3f} | "
                         f"{'yes' if r['build_s'] <= COMPILE_TARGET_S else '**no**'} | "
                         f"{'%.1f' % c['compile_s'] if c else '—'} |")
    mem = [r for r in rows if r.get("peak_mib") is not None]
    if mem:
        what = "device memory allocated above the baseline" if gpu else "resident-set growth"
        lines += ["", f"Peak memory ({what} during one call, fresh process, MiB):", "",
                  "| case | task | contender | peak MiB |", "|---|---|---|---|"]
        lines += [f"| {r['case']} | {TASK_TITLES[r['task']]} | {r['contender']} | {r['peak_mib']:.1f} |" for r in mem]
        for m in result["memory_targets"]:
            lines.append("")
            lines.append(f"Memory target, {m['case']}, J Σ Jᵀ: fxjac {m['fxjac_mib']:.1f} MiB vs {m['best_other']} "
                         f"{m['best_other_mib']:.1f} MiB = {m['ratio']:.2f} (target ≤ {m['target']}): "
                         f"{'met' if m['met'] else 'NOT met'}")
    reasons = {}
    for r in rows:
        if r["status"] == "n/a" and r["task"] not in ("forward", "fwd_bwd"):
            reasons.setdefault((r["contender"], r["reason"]), []).append(f"{r['case']}/{r['task']}")
    if reasons:
        lines += ["", "Not applicable (the baselines forward and forward+backward are plain PyTorch only):", ""]
        for (c, why), where in reasons.items():
            # a reason by design: its tasks; a failure: where it failed
            what = where if why.startswith("error") else sorted({w.split("/")[1] for w in where})
            lines.append(f"- {c} — {', '.join(what)}: {why}")
    notes = [r for r in rows if r["note"] and r["status"] != "n/a"]
    if notes:
        lines += ["", "Notes:", ""]
        for (c, note), where in _group(notes).items():
            lines.append(f"- {c} — {', '.join(where)}: {note}")
    if result.get("profiles"):
        lines += ["", "Profiles of fxjac where a target is missed (torch.profiler, top "
                  + ("kernels by GPU time" if gpu else "ops by self CPU time") + "):", ""]
        for key, ops in result["profiles"].items():
            head = ""
            if ops and ops[0].get("summary"):
                sm = ops[0]
                head = (f"{sm['aten_calls']} aten calls, {'kernel' if gpu else 'op self'} time "
                        f"{sm['aten_self_ms']:.3g} of {sm['wall_ms']:.3g} ms (profiled); ")
                ops = ops[1:]
            desc = ", ".join(f"{_short(o['op'])} {o['share']:.0%}" if "op" in o else o.get("error", "")
                             for o in ops[:5])
            lines.append(f"- {key}: {head}{desc}")
    return "\n".join(lines)


def _short(op: str, width: int = 60) -> str:
    """An op or kernel name cut to ``width`` characters (CUDA kernels' template names run to pages)."""
    return op if len(op) <= width else op[:width - 1] + "…"


def _group(rows) -> dict:
    out = {}
    for r in rows:
        out.setdefault((r["contender"], r["note"]), []).append(f"{r['case']}/{r['task']}")
    return out


def _f(x, prefix=""):
    return "—" if x is None else f"{prefix}{x:.2f}" if x < 100 else f"{prefix}{x:,.0f}"


def _cpu() -> str:
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{name}, {os.cpu_count()} logical CPUs"


def _git() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=10).stdout.strip()
    except Exception:  # noqa: BLE001
        return ""


def _versions() -> dict:
    from importlib import metadata

    out = {}
    for dist in ("torch", "backpack-for-pytorch", "curvlinops-for-pytorch", "laplace-torch", "asdfghjkl"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out


def _warm_up() -> None:
    """Import and exercise fxjac once, so the first timed build does not pay for module imports."""
    import fxjac

    m = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2)).eval()
    x = torch.randn(2, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fxjac.jvp(m, wrt="params", example_inputs=(x,))(x, torch.randn(26))
        fxjac.ggn(m, example_inputs=(x,))(x)


# --- main ----------------------------------------------------------------------------------------------------


def parse(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny presets and batches, few repeats (a smoke test)")
    p.add_argument("--cases", nargs="+", default=None, help="case names (default: all of the mode)")
    p.add_argument("--tasks", nargs="+", default=None, help=f"tasks (default: all): {', '.join(TASKS[2:])}")
    p.add_argument("--contenders", nargs="+", default=None, help=f"contenders: {', '.join(C.CONTENDERS)}")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"), help="folder for the JSON results")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"),
                   help="where the models, data and products live (default cpu; cuda: the results' files are "
                   "prefixed cuda-)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch.set_num_threads (default 1: the machine is shared; 1 thread times steadily)")
    p.add_argument("--compile-backend", default=None, help="torch.compile backend (default: inductor; quick: "
                   "aot_eager)")
    p.add_argument("--compile-cases", nargs="*", default=None,
                   help="cases with the fxjac+compile contender (default: mlp, cnn, small_mlp; quick: small_mlp)")
    p.add_argument("--compile-budget", type=float, default=None,
                   help="seconds of torch.compile after which the remaining compiles are skipped (default 240; "
                   "quick 20)")
    p.add_argument("--time-limit", type=float, default=None,
                   help="seconds after which the remaining measurements are skipped, reported as such (default "
                   "1080; quick 240)")
    p.add_argument("--memory", action=argparse.BooleanOptionalAction, default=None,
                   help="measure peak memory in subprocesses (default: on; off with --quick)")
    p.add_argument("--memory-cases", nargs="*", default=["mlp", "large_mlp"])
    p.add_argument("--memory-tasks", nargs="*", default=["jsjt_diag", "per_sample_grad", "diag_ggn"])
    p.add_argument("--profile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.profiler on fxjac where a target is missed (default: on; off with --quick)")
    p.add_argument("--verbose", action="store_true", help="print tracebacks of failing contenders")
    p.add_argument("--render", metavar="JSON", help="print the Markdown tables of a saved result and exit")
    # internal: one memory measurement in a fresh process
    p.add_argument("--memory-child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--case", help=argparse.SUPPRESS)
    p.add_argument("--task", help=argparse.SUPPRESS)
    p.add_argument("--contender", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    q = args.quick
    if args.compile_backend is None:
        args.compile_backend = "aot_eager" if q else "inductor"
    if args.compile_cases is None:
        args.compile_cases = ["small_mlp"] if q else ["mlp", "cnn", "small_mlp"]
    if args.compile_budget is None:
        args.compile_budget = 20.0 if q else 240.0
    if args.time_limit is None:
        args.time_limit = 240.0 if q else 1080.0
    if args.memory is None:
        args.memory = not q
    if args.profile is None:
        args.profile = not q
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error(f"--device cuda: this torch ({torch.__version__}) sees no CUDA device")
    known = {c.name for c in cases(q)}
    for name in args.cases or []:
        if name not in known:
            p.error(f"unknown case {name!r}; one of {sorted(known)}")
    for t in args.tasks or []:
        if t not in TASKS:
            p.error(f"unknown task {t!r}; one of {list(TASKS)}")
    for c in args.contenders or []:
        if c not in C.CONTENDERS:
            p.error(f"unknown contender {c!r}; one of {list(C.CONTENDERS)}")
    return args


def main(argv=None) -> int:
    args = parse(argv)
    if args.memory_child:
        return memory_child(args)
    if args.render:
        print(markdown(json.loads(Path(args.render).read_text())))
        return 0
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    # The first fxjac product sets glibc's thresholds for the whole process (Note [glibc's heap and column
    # stacks] in fxjac/rules/_rt.py): set them before anything is timed, so every contender runs under them.
    malloc_tuned = _rt.tune_malloc()
    t_start = time.perf_counter()
    _warm_up()
    timing = Timing(args.quick, sync=torch.cuda.synchronize if args.device == "cuda" else None)
    state = {"compile_spent": 0.0, "profiles": {}, "t0": t_start}
    rows = []
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # latest.json, latest-quick.json, latest-cuda.json, ...; the timestamped file carries the same tag.
    tag = "-".join(t for t in ("cuda" if args.device == "cuda" else "", "quick" if args.quick else "") if t)
    suffix = "-" + tag if tag else ""
    partial = out / f"partial{suffix}.json"  # rows so far, removed when the run ends
    for case in cases(args.quick):
        if args.cases and case.name not in args.cases:
            continue
        case_rows = run_case(case, args, timing, state)
        if args.memory and case.name in args.memory_cases:
            measure_memory(case_rows, args, state)
        rows += case_rows
        partial.write_text(json.dumps({"rows": rows, "profiles": state["profiles"]}, default=str))
    meta = {"mode": "quick" if args.quick else "full", "date": dt.datetime.now().isoformat(timespec="seconds"),
            "torch": torch.__version__, "threads": args.threads, "cpu": _cpu(), "device": args.device,
            "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None,
            "python": platform.python_version(), "malloc": "fxjac's thresholds" if malloc_tuned else "unchanged",
            "versions": _versions(), "git": _git(), "compile_backend": args.compile_backend,
            "compile_cases": args.compile_cases, "tolerance": TOLERANCE, "argv": sys.argv[1:],
            "cases": [c.__dict__ for c in cases(args.quick) if not args.cases or c.name in args.cases],
            "wall_s": None}
    result = {"meta": meta, "rows": rows, "targets": evaluate_targets(rows), "memory_targets": evaluate_memory(rows),
              "profiles": state["profiles"]}
    meta["wall_s"] = time.perf_counter() - t_start
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    text = json.dumps(result, indent=1, default=str)
    stamped = out / f"{tag + '-' if tag else ''}{stamp}.json"
    stamped.write_text(text)
    (out / f"latest{suffix}.json").write_text(text)
    partial.unlink(missing_ok=True)
    print(markdown(result))
    print(f"\nwrote {stamped} ({meta['wall_s']:.0f} s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
