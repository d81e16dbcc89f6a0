# make run   install what is missing, build, archive the examples, serve them (Ctrl-C stops)
# make test  install what is missing, build, run every test
# make lint  formatting and clippy
SHELL := /bin/bash
CARGO ?= cargo
BIN := target/release
EXAMPLES := $(notdir $(patsubst %/build.sh,%,$(wildcard examples/*/build.sh)))
ARCHIVES := $(EXAMPLES:%=model-store/%.mar)

.PHONY: setup build archives run test lint clean

setup:
	@scripts/setup.sh

build: setup
	$(CARGO) build --release --bins

# One archive per example; rebuilt when the example or the archiver changes.
model-store/%.mar: examples/%/* $(BIN)/tch-model-archiver
	examples/$*/build.sh

archives: build $(ARCHIVES)

run: archives
	$(BIN)/tchserve --foreground --model-store model-store --models all --ncs

test: archives
	$(CARGO) test --release --workspace

lint: setup
	$(CARGO) fmt --all --check
	$(CARGO) clippy --release --all-targets -- -D warnings

clean:
	$(CARGO) clean
	rm -rf build $(ARCHIVES)
