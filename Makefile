# make run   install what is missing, build, archive the examples, serve them (Ctrl-C stops)
# make test  install what is missing, build, run every test
# make lint  formatting and clippy
SHELL := /bin/bash
CARGO ?= cargo
BIN := target/release
EXAMPLES := $(notdir $(patsubst %/build.sh,%,$(wildcard examples/*/build.sh)))
# One stamp per example: its build.sh writes the archive(s) into model-store/.
STAMPS := $(EXAMPLES:%=build/examples/%.stamp)

.PHONY: setup build archives run test lint clean

setup:
	@scripts/setup.sh

build: setup
	$(CARGO) build --release --bins

# Rebuilt when the example or the archiver changes, or its archive is missing.
build/examples/%.stamp: examples/%/* $(BIN)/tch-model-archiver
	examples/$*/build.sh
	@touch $@

archives: build $(STAMPS)

# Without token authorization, so the README's curl lines work as they are.
run: archives
	$(BIN)/tchserve --foreground --model-store model-store --models all --ncs --disable-token-auth

test: archives
	$(CARGO) test --release --workspace

lint: setup
	$(CARGO) fmt --all --check
	$(CARGO) clippy --release --all-targets -- -D warnings

clean:
	$(CARGO) clean
	rm -rf build model-store/*.mar
