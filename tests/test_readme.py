"""Every Python code block of the README runs exactly as written."""

import re
import warnings
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_examples():
    assert len(BLOCKS) >= 4


@pytest.mark.parametrize("i", range(len(BLOCKS)))
def test_readme_block_runs(i):
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="fxjac: these ops")  # a README example must not hit the fallback
        exec(compile(BLOCKS[i], f"README block {i}", "exec"), {"__name__": f"readme_{i}"})
