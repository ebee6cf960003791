# Both targets create/refresh .venv from pyproject.toml + constraints.txt first (stamp file).
PY      ?= python3
VENV    := .venv
STAMP   := $(VENV)/.installed
PYTHON  := $(VENV)/bin/python
# 8 simulated CPU devices: sharding is exercised without an accelerator (docs/DESIGN.md §6).
export XLA_FLAGS ?= --xla_force_host_platform_device_count=8
export PYTHONHASHSEED := 0
# The [tpu] extra (libtpu, for AOT compiles: tests/test_aot.py) makes JAX probe for a TPU at backend
# start (warnings, ~0.3 s a process); tests and dry runs use the CPU. AOT still works under it.
export JAX_PLATFORMS ?= cpu

.PHONY: test dryrun venv clean chromium lint
venv: $(STAMP)

# setup.py + the C source: the editable install compiles data/_jpeg_crop.c in place.
$(STAMP): pyproject.toml constraints.txt setup.py data/_jpeg_crop.c
	test -x $(PYTHON) || $(PY) -m venv $(VENV)
	$(PYTHON) -m pip install -q --upgrade pip
# [timm]: torch + timm for tests/test_export.py's parity checks (CUDA torch build, ~5.4 GB, ~2 min;
# docs/INTERFACES.md). [tpu]: libtpu 0.0.42.1 for AOT compiles (213 MB wheel, 6.5 s from the local index).
	$(PYTHON) -m pip install -q -c constraints.txt -e '.[dev,timm,tpu]'
	touch $(STAMP)

# The run report is checked in a real browser (tests/test_report.py): Debian's chromium, installed
# when absent (CI runs as root; the test fails rather than skips without it).
chromium:
	@command -v chromium >/dev/null || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium)

# One line length (100) and pyflakes, configured in pyproject.toml [tool.ruff]; `ruff format`
# keeps code within it (comments and strings are wrapped by hand).
lint: $(STAMP)
	$(PYTHON) -m ruff check --quiet .

test: $(STAMP) chromium lint
	$(PYTHON) -m pytest -n 2 --dist loadgroup -q $(PYTEST_ARGS)

dryrun: $(STAMP)
	$(PYTHON) -m launch.run --config launch/configs/tiny.py $(DRYRUN_ARGS)

clean:
	rm -rf $(VENV) workdir
