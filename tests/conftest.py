"""Shared pytest set-up: the tests directory on the path (for ``reference``), quiet fallback warnings."""

import sys
import warnings
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))


@pytest.fixture
def one_thread():
    """One intra-op thread: on tiny tensors and two shared cores, threads only wait on each other (a float64
    conv1d of a few entries takes 20 ms with 2 busy threads, 5 us with one)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def _quiet_fallback_warnings():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="fxjac: these ops have no structured rule")
        yield


# --- rule coverage: every registered spelling must be exercised by some test ------------------------------
# `make test` sets FXJAC_RULE_COVERAGE=1: after a full run, a key of the rule table that no test reached
# (through its structured rule, or strict mode's listing for the constants only it meets: a rank read that stays
# traced) fails the session, so a new rule cannot land without a sample.

_APPLIED: set = set()


def pytest_configure(config):
    import passes.builder as builder
    from passes.protocol import rule_key

    original = builder.Builder.structured

    def recording(self, node):  # the rules the passes apply, and those strict mode's listing finds
        rule = original(self, node)
        if rule is not None:
            try:
                _APPLIED.add(rule_key(node))
            except TypeError:
                pass
        return rule

    builder.Builder.structured = recording


def pytest_sessionfinish(session, exitstatus):
    import os

    if os.environ.get("FXJAC_RULE_COVERAGE") != "1" or exitstatus != 0:
        return
    partial = session.config.option.keyword or session.config.option.markexpr or \
        [a.rstrip("/") for a in session.config.args] not in ([], ["tests"])
    if partial:
        return  # coverage is judged on the whole suite only
    from fxjac.rules import RULES
    from fxjac.rules.constant import SIZED_FACTORIES  # looked up by strict mode's listing only

    missing = sorted(getattr(k, "__qualname__", None) or str(k) for k in RULES
                     if k not in _APPLIED and k not in SIZED_FACTORIES)
    if missing:
        print("\nRule coverage: these registered keys were never exercised by a test:\n  " + "\n  ".join(missing))
        session.exitstatus = 1
