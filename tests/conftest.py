"""Shared pytest set-up: the tests directory on the path (for ``reference``), quiet fallback warnings."""

import sys
import warnings
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))


@pytest.fixture(autouse=True)
def _quiet_fallback_warnings():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="fxjac: these ops have no structured rule")
        yield
