# fxjac development tasks (GNU make).
#
# Every pip call goes through constraints.txt (torch==2.13.0, the local CPU wheel). Anything that declares a
# torch (or torchvision) dependency is installed with --no-deps, its own dependencies listed explicitly below,
# so no CUDA torch ever arrives. The last step of `install` asserts the torch version.

PY   ?= python3
VENV ?= .venv

VPY   := $(VENV)/bin/python
PIP   := $(VPY) -m pip
CONS  := -c constraints.txt
STAMP := $(VENV)/.installed

# Peers used by tests (comparison baselines), pinned to versions whose Requires-Dist was checked.
# laplace-torch 0.3 requires asdfghjkl==0.1a4 exactly; backpack and laplace also require torchvision (not
# installed: there is no CPU torchvision here, and neither imports it at package import time).
PEERS := backpack-for-pytorch==1.7.1 curvlinops-for-pytorch==3.0.1 laplace-torch==0.3 asdfghjkl==0.1a4
# Dependencies of the peers that themselves require torch: also --no-deps, also pinned.
PEER_TORCH_DEPS := unfoldNd==0.2.3 einconv==0.1.0 linear_operator==0.6.1 torchmetrics==1.9.0
# Pure-Python dependencies of all of the above: installed normally (they resolve their own deps).
PEER_PURE_DEPS := "einops>=0.3,<1.0" "opt-einsum>=3.4" "lightning-utilities>=0.15.3" "packaging>=22" \
	typing_extensions "numpy>=1.21" "scipy>=1.12" "tqdm>=4.66"
# Import names of the peers, checked (non-fatally) at the end of install.
PEER_IMPORTS := backpack curvlinops laplace asdl

.PHONY: install test demo bench bench-quick lint clean distclean

install: $(STAMP)

# The package dirs are prerequisites too: an editable install made before they existed maps nothing.
$(STAMP): pyproject.toml constraints.txt Makefile $(wildcard fxjac/__init__.py passes/__init__.py)
	@test -x $(VPY) || $(PY) -m venv $(VENV)
	@if ! command -v dot >/dev/null 2>&1; then \
		echo "graphviz 'dot' not found: installing Debian graphviz"; \
		{ apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y graphviz; } \
			|| echo "WARNING: could not install graphviz; rendering with fxjac.draw will fail"; \
	fi
	$(PIP) install -q --upgrade pip $(CONS)
	$(PIP) install $(CONS) torch==2.13.0
	$(PIP) install $(CONS) -e ".[dev,examples]"
	$(PIP) install $(CONS) $(PEER_PURE_DEPS)
	$(PIP) install $(CONS) --no-deps $(PEER_TORCH_DEPS) $(PEERS)
	@for m in $(PEER_IMPORTS); do \
		if $(VPY) -c "import $$m" >/dev/null 2>&1; then echo "peer import ok: $$m"; \
		else echo "WARNING: peer does not import: $$m"; fi; \
	done
	$(VPY) -c "import torch; assert torch.__version__.startswith('2.13.0'), torch.__version__; print('torch', torch.__version__)"
	@touch $@

test: install
	FXJAC_RULE_COVERAGE=1 $(VPY) -m pytest $(PYTEST_ARGS)

demo: install
	$(VENV)/bin/fxjac demo

bench: install
	$(VPY) -m benchmarks.run

bench-quick: install
	$(VPY) -m benchmarks.run --quick

lint: install
	$(VENV)/bin/ruff check .

clean:
	rm -rf build dist *.egg-info .pytest_cache .ruff_cache .hypothesis fxjac-demo $(STAMP)
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -exec rm -rf {} +

# Also drops the virtual environment (the next install downloads everything again).
distclean: clean
	rm -rf $(VENV)
