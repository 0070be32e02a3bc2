# covnoise: the two commands a fresh machine needs are `make demo` and `make test`.
CARGO ?= cargo
# Where cargo puts the binary (CARGO_TARGET_DIR when set, as cargo does).
BIN := $(or $(CARGO_TARGET_DIR),target)/release/covnoise
EXAMPLES := $(or $(CARGO_TARGET_DIR),target)/release/examples
DATA_DIR ?= /usr/share/datasets/fashion-mnist
DEMO_OUT ?= demo-out

.PHONY: all build test check-boundary test-mpi test-learner check-features check-gpu lint demo data bench bench-venv clean

all: build

## Every target of both crates (binary, tests, examples) in one build, so
## that `make test` after `make demo` compiles nothing: the tests' dev
## dependencies change some shared crates' features, and a build without
## them would compile burn a second time for the tests.
build:
	$(CARGO) build --release --workspace --all-targets

## The whole test suite (release build: the numerical tests train real models):
## the library's tests (its own crate, on data they generate) and the lab's,
## doctests included, in one build of burn shared with `make build`.
## MPI tests run too when OpenMPI is installed (mpirun on PATH).
test:
	$(CARGO) test --release --workspace
	@$(MAKE) --no-print-directory check-boundary
	@# The examples as `cargo test` built them (a `cargo run -p` of one crate
	@# would resolve features for that crate alone and compile burn again).
	@# A token model (Embedding, LayerNorm, per-token MLP) with exact diagonal noise.
	$(EXAMPLES)/sequence 3 2048
	@# A burn user's own model with burn's SGD + diagonal-Fisher noise, on a slice.
	$(EXAMPLES)/burn_user 1 4096
	@if command -v mpirun >/dev/null 2>&1; then \
		$(MAKE) --no-print-directory test-mpi; \
	else \
		echo "note: mpirun not found, MPI tests skipped (apt-get install openmpi-bin libopenmpi-dev)"; \
	fi

## The library depends on no command-line, plotting, config or theory
## crate: none anywhere in its tree, and none directly (`toml` is in the tree
## only through burn 0.22's own cubecl-environment, not through covnoise).
check-boundary:
	@tree=$$($(CARGO) tree -p covnoise -e normal --prefix none) || exit 1; \
	direct=$$($(CARGO) tree -p covnoise -e normal --prefix none --depth 1) || exit 1; \
	bad=$$(printf '%s\n' "$$tree" | grep -E '^(anyhow|clap|indicatif|plotters|nalgebra|crc32fast|flate2|mpi) ' | sort -u); \
	bad="$$bad$$(printf '%s\n' "$$direct" | grep -E '^(toml|tempfile|burn-pack) ' | sort -u)"; \
	if [ -n "$$bad" ]; then echo "covnoise (the library) depends on lab crates:"; echo "$$bad"; exit 1; fi; \
	echo "covnoise (the library): $$(printf '%s\n' "$$tree" | sort -u | wc -l) packages, none of the lab's"

## burn-train's Learner with the noise stage inside TrainStep::step (a
## second build of burn: its `train` feature turns on burn-core's datasets).
test-learner:
	$(CARGO) run --release -p covnoise-lab --features learner --example learner -- 1 4096

## The lab's optional features build together (cargo check: the GPU and
## BLAS backends need drivers this machine may lack; DOCS_RS=1 skips
## cubecl-cuda's download). `tch` is left out: its build script needs
## libtorch 2.9 installed (LIBTORCH), which no Debian package provides.
check-features:
	DOCS_RS=1 $(CARGO) check --release -p covnoise-lab --features ndarray,openblas,wgpu,cuda,mpi,learner

## The GPU devices build (no GPU needed to check them). The wgpu build also
## trains briefly on lavapipe, Debian's software Vulkan device
## (mesa-vulkan-drivers), when it is installed.
check-gpu:
	$(CARGO) build --release -p covnoise-lab --features wgpu --bin covnoise
	@if ls /usr/share/vulkan/icd.d/lvp_icd*.json >/dev/null 2>&1; then \
		XDG_RUNTIME_DIR=$${XDG_RUNTIME_DIR:-/tmp} $(BIN) train --device wgpu-cpu --epochs 1 \
			--train-limit 4096 --test-limit 1000 --batch-size 1024 --hidden 256 --noise diag --quiet; \
	else \
		echo "note: lavapipe not found, wgpu run skipped (apt-get install mesa-vulkan-drivers)"; \
	fi
	@# cubecl-cuda's LLVM bundle is downloaded by a build script, which this
	@# network cannot reach; DOCS_RS=1 skips that native setup for a check.
	DOCS_RS=1 $(CARGO) check --release -p covnoise-lab --features cuda

test-mpi:
	$(CARGO) test --release -p covnoise-lab --features mpi --test mpi

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --release --workspace --all-targets -- -D warnings
	RUSTDOCFLAGS="-D warnings" $(CARGO) doc --release --workspace --no-deps
	@if command -v mpirun >/dev/null 2>&1; then \
		$(CARGO) clippy --release -p covnoise-lab --all-targets --features mpi -- -D warnings; \
	fi

## Fashion-MNIST from Debian's dataset-fashion-mnist; installed when missing
## and we may (root or passwordless sudo), else the command to run is printed.
data:
	@if [ -f "$(DATA_DIR)/train-images-idx3-ubyte.gz" ] || [ -f "$(DATA_DIR)/train-images-idx3-ubyte" ] || [ -n "$$COVNOISE_DATA" ]; then \
		echo "data: Fashion-MNIST found"; \
	elif [ "$$(id -u)" = 0 ]; then \
		apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist fonts-dejavu-core; \
	elif sudo -n true 2>/dev/null; then \
		sudo apt-get update -qq && sudo apt-get install -y -qq dataset-fashion-mnist fonts-dejavu-core; \
	else \
		echo "Fashion-MNIST is missing: run 'sudo apt-get install dataset-fashion-mnist fonts-dejavu-core'"; \
		echo "or set COVNOISE_DATA=/path/to/dir with the four IDX files"; exit 1; \
	fi

## Small batch vs large batch vs large batch + diagonal-Fisher noise,
## 3 seeds x 10 epochs; prints the table, writes $(DEMO_OUT)/study.md and plots.
demo: data build
	$(BIN) study studies/demo.toml --out $(DEMO_OUT) --jobs 2

bench: build
	$(BIN) bench --json bench-results.json

## The Python environment of `covnoise bench --against pytorch|backpack`
## (PyPI's torch, whose Linux wheel pulls ~5 GB of CUDA libraries it does
## not use on the CPU, BackPACK and numpy), in bench/.venv. Optional, never
## part of the tests.
bench-venv:
	python3 -m venv bench/.venv
	bench/.venv/bin/pip install torch==2.9.0 backpack-for-pytorch==1.7.1 numpy

clean:
	$(CARGO) clean
	rm -rf $(DEMO_OUT)
