# Two entry points, each setting up what it needs (a local virtual
# environment with torch, the built extension) and quick when nothing changed:
#   make bench   compare fastrnn with torch.nn on this machine (python -m fastrnn.bench;
#                options through BENCH_ARGS, e.g. make bench BENCH_ARGS=--quick)
#   make test    run the test suite
# and one for a CUDA machine:
#   make gpu-check   the device check (bench/gpu_check.py) with the machine's own python3:
#                    build, the CUDA tests, the benchmark against cuDNN; files under $OUT.
#                    DEVICE=cpu runs the same command on CPU in .venv (Triton interpreter,
#                    tiny grid); GPU_CHECK_ARGS=--quick is the short form.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
ENV_STAMP := $(VENV)/.requirements-installed
EXT_STAMP := build/.extension-built
CSRC := $(shell find csrc -name '*.cpp' -o -name '*.h' -o -name '*.inc')

DEVICE ?= cuda

.PHONY: test bench build clean gpu-check

# Two pytest-xdist workers: on two cores the suite took 24-29 minutes
# against 42 in one process. PYTEST_ARGS= runs it in one.
PYTEST_ARGS ?= -n 2

test: build
	$(PY) -m pytest $(PYTEST_ARGS) tests

bench: build
	$(PY) -m fastrnn.bench $(BENCH_ARGS)

ifeq ($(DEVICE),cpu)
gpu-check: build
	$(PY) bench/gpu_check.py --device cpu $(GPU_CHECK_ARGS)
else
gpu-check:
	$(PYTHON) bench/gpu_check.py --device $(DEVICE) $(GPU_CHECK_ARGS)
endif

build: $(EXT_STAMP)

$(ENV_STAMP): requirements-dev.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-dev.txt setuptools wheel
	touch $@

# The editable install builds fastrnn/_C in place against the venv's torch;
# later source changes rebuild incrementally.
$(EXT_STAMP): $(ENV_STAMP) $(CSRC) setup.py
	test -f $(VENV)/.editable || { $(PY) -m pip install --quiet --no-build-isolation --no-deps -e . && touch $(VENV)/.editable; }
	MAX_JOBS=2 $(PY) setup.py --quiet build_ext --inplace
	mkdir -p build && touch $@

clean:
	rm -rf build fastrnn/*.so $(VENV)
