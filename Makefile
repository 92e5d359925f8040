# Set-up and checks. `make demo` runs the main job, `make test` runs every test; both create the
# virtual environment .venv and install what they need on a fresh machine.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
JOBS ?= $(shell nproc)
# torch: the CPU build. On these machines pip takes it from local disk; never a CUDA build here.
TORCH_SPEC ?= torch==2.13.0
BUILD_DEPS := scikit-build-core>=0.10 pybind11>=2.12
RUNTIME_DEPS := numpy psutil PyYAML prometheus-client nvidia-ml-py matplotlib tqdm
TEST_DEPS := pytest pytest-benchmark pytest-timeout hypothesis ruff mypy types-PyYAML types-psutil

.PHONY: demo test install pytest bench-check ctest ctest-sanitize lint clean

$(VENV)/.deps-stamp: Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q $(foreach d,$(BUILD_DEPS) $(RUNTIME_DEPS) $(TEST_DEPS),"$(d)")
	touch $@

# Editable install; the CMake build directory is kept under build/ so rebuilds are incremental.
install: $(VENV)/.deps-stamp
	$(PIP) install -q --no-build-isolation -e .
	$(PY) -c "import autoglm_rt, json; print(json.dumps(autoglm_rt.build_info()))"

# DEMO_ARGS: e.g. --quick, --out DIR, --gpus 2 (see autoglm-rt demo --help).
demo: install
	$(VENV)/bin/autoglm-rt info
	$(VENV)/bin/autoglm-rt demo $(DEMO_ARGS)

# Tests start a real Prometheus server on 127.0.0.1; its Debian package is installed when missing.
pytest: install
	bash deploy/install_prometheus.sh
	$(PY) -m pytest -q --benchmark-disable tests

# Every benches/bench_*.py once with benchmarking on (one round, no warm-up: about 30 s), so a
# benchmark that only passes with --benchmark-disable (inputs mutated between rounds) fails CI.
bench-check: install
	$(PY) -m pytest -q -p no:cacheprovider benches --benchmark-min-rounds=1 --benchmark-max-time=0.000001 \
	  --benchmark-warmup=off

# C++ unit tests (CUDA sources compiled for one architecture only: they cannot run here anyway).
ctest: $(VENV)/.deps-stamp
	mkdir -p build
	cmake -S . -B build/ctest -G Ninja -DAUTOGLM_RT_BUILD_TESTS=ON -DAUTOGLM_RT_BUILD_PYTHON=OFF \
	  -DCMAKE_CUDA_ARCHITECTURES=90-real -DCMAKE_BUILD_TYPE=RelWithDebInfo > build/ctest.log 2>&1 \
	  || (cat build/ctest.log; exit 1)
	cmake --build build/ctest -j $(JOBS)
	ctest --test-dir build/ctest --output-on-failure

# The same tests under AddressSanitizer and UndefinedBehaviorSanitizer (CPU build).
ctest-sanitize: $(VENV)/.deps-stamp
	mkdir -p build
	cmake -S . -B build/asan -G Ninja -DAUTOGLM_RT_BUILD_TESTS=ON -DAUTOGLM_RT_BUILD_PYTHON=OFF \
	  -DAUTOGLM_RT_CUDA=OFF -DAUTOGLM_RT_SANITIZE=ON -DCMAKE_BUILD_TYPE=RelWithDebInfo > build/asan.log 2>&1 \
	  || (cat build/asan.log; exit 1)
	cmake --build build/asan -j $(JOBS)
	ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
	  ctest --test-dir build/asan --output-on-failure

lint: $(VENV)/.deps-stamp
	$(VENV)/bin/ruff check python tests benches conftest.py
	$(VENV)/bin/ruff format --check python tests benches conftest.py
	$(VENV)/bin/mypy

test: lint ctest ctest-sanitize pytest bench-check

clean:
	rm -rf build python/autoglm_rt/_C*.so
