# cellplane: two commands do everything on a fresh machine.
#   make demo   a local two-region platform: real control planes, cells on real stores, the router (the main job)
#               (REAL=1: the cells as real pods, from the charts and the images built here)
#   make test   every test (unit, property, real API servers, Helm), plus fmt and clippy
SHELL := /bin/bash
CARGO ?= cargo

.PHONY: all setup tools build install images test unit e2e lint fmt fuzz crds demo bench bench-scale bench-drill clean

all: test

# System packages and the real test servers (cached under ~/.cache/cellplane).
setup:
	@bash e2e/bin/setup

# The real node's own servers (containerd, CNI, CoreDNS, kube-router) and the store images
# are built on first use by the real-node test and `make demo REAL=1`.
tools: setup
	@e2e/bin/tools --base >/dev/null
	@e2e/bin/stores install

build:
	$(CARGO) build --workspace --all-targets

# The SRE's command on PATH, also as a kubectl plugin (`kubectl cellplane ...`):
#   make install                       release build into ~/.local/bin
#   make install PREFIX=/usr/local     (PROFILE=debug installs the debug build already made)
PREFIX ?= $(HOME)/.local
PROFILE ?= release
install:
	$(CARGO) build $(if $(filter release,$(PROFILE)),--release,) -p cellplane-operator --bin cellplane
	install -d $(PREFIX)/bin
	install -m 0755 target/$(PROFILE)/cellplane $(PREFIX)/bin/cellplane
	ln -sf cellplane $(PREFIX)/bin/kubectl-cellplane
	@echo "installed $(PREFIX)/bin/cellplane and $(PREFIX)/bin/kubectl-cellplane (kubectl cellplane ...)"

# OCI images of the operator, the router, the reference app (shop) and the CLI, built
# offline from the release binaries: target/images/<name>-<version>.oci.tar
# (`ctr images import` names them ghcr.io/cellplane/<name>:<version>).
images:
	@e2e/bin/images --build --profile $(PROFILE)

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings
	@# cargo-deny reads the metadata of every platform's dependencies, which a build on
	@# this platform never downloads: fetch them first (from the registry), then check offline.
	$(CARGO) fetch --locked -q
	$(CARGO) deny --offline check licenses bans
	@e2e/bin/check-deps

unit:
	$(CARGO) test --workspace --exclude cellplane-e2e

e2e: tools build
	$(CARGO) test -p cellplane-e2e

# e2e/bin/tests: `cargo test --workspace`, with the real-node test run beside the others.
test: tools build lint
	@CARGO=$(CARGO) e2e/bin/tests
	@e2e/bin/fuzz

# cargo-fuzz on the router's parsers (FUZZ_SECS per target; needs a nightly toolchain).
fuzz:
	@e2e/bin/fuzz

# Regenerate the CRDs from the Rust types (a test fails when they are stale).
crds:
	$(CARGO) run -q -p cellplane-operator -- crd > crds/cellplane.yaml
	cp crds/cellplane.yaml charts/cellplane-operator/crds/cellplane.yaml

# REAL=1: the cells as real pods on a real node per region (the charts, the built images);
# KEEP=1 leaves it running.
demo: tools
ifeq ($(REAL),1)
	$(CARGO) build --workspace --bins
	@target/debug/demo-real $(if $(filter 1,$(KEEP)),--keep)
else
	$(CARGO) build -p cellplane-operator -p cellplane-router -p cellplane-cell-app -p cellplane-e2e --bins
	@e2e/bin/demo
endif

# Benchmarks print medians and ratios measured side by side; none is a timed test.
bench: tools
	@bash e2e/bin/setup --bench
	$(CARGO) bench -p cellplane-cells --bench slot_lookup
	$(CARGO) bench -p cellplane-router --bench decision --bench wire
	$(CARGO) build --release -p cellplane-operator -p cellplane-router -p cellplane-cell-app
	@e2e/bin/bench-router
	@e2e/bin/bench-cell
	$(CARGO) build -p cellplane-router
	$(CARGO) bench -p cellplane-e2e --bench propagation
	@e2e/bin/bench-scale
	@$(MAKE) --no-print-directory bench-drill

# Planned switchovers under load on the two-region lab: write freeze, router ack
# propagation, acknowledged orders lost (DRILLS=20).
bench-drill: tools
	$(CARGO) build --release --workspace --bins
	CELLPLANE_PROFILE=release target/release/bench-drill

clean:
	$(CARGO) clean
