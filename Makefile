# KubeTune developer entrypoints. Each target calls one command; the Python environment lives in
# .venv/ and is (re)installed when pyproject.toml changes. pip and Go caches live under ~/.cache.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
EXTRAS ?= operator,trainer,pull,dev

.PHONY: help venv scan-venv binaries images test check unit lint crd cluster-up cluster-down cluster-status bench chaos gpu-check chart-docs demo demo-down

help:  ## list targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/'

$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -c constraints.txt -e '.[$(EXTRAS)]'
	touch $@

venv: $(VENV)/.installed  ## create .venv/ with the operator, trainer and dev extras

# checkov (manifest scanner) lives in its own environment: its pins clash with the project's.
SCAN_VENV := .venv-scan
$(SCAN_VENV)/.installed: hack/scan-requirements.txt
	test -x $(SCAN_VENV)/bin/python || python3 -m venv $(SCAN_VENV)
	$(SCAN_VENV)/bin/python -m pip install -q -r hack/scan-requirements.txt
	touch $@

scan-venv: $(SCAN_VENV)/.installed  ## create .venv-scan/ with checkov (tests/helm/test_scan.py runs it)

binaries:  ## build the local cluster's pinned binaries from their Go modules (cached in ~/.cache/kubetune/bin)
	bash hack/build-binaries.sh >/dev/null

images: venv  ## build the operator and trainer images (buildah, Debian base, constraints.txt); push to the local registry if up
	$(PY) -m devcluster.images build --push-local

# The binaries are built before pytest: a cold Go build is slow, and no test's timeout should hold it.
test: lint scan-venv binaries  ## everything this machine can run: lint, unit, trainer (CPU), e2e (local cluster), helm
	$(PY) -m pytest tests --durations=30

check: lint  ## the fast tier: lint, unit tests and the trainer's fast tests (no cluster, no containers); a plain pytest
	$(PY) -m pytest

unit: venv  ## unit tests only (no cluster, no training)
	$(PY) -m pytest tests/unit

lint: venv  ## ruff + mypy + generated-file drift
	$(VENV)/bin/ruff check contract operator trainer_image devcluster hack tests
	$(VENV)/bin/mypy contract/kubetune_contract operator/kubetune trainer_image/kubetune_trainer devcluster
	$(VENV)/bin/kubetune crd --check
	$(PY) hack/chart_docs.py --check

crd: venv  ## regenerate crds/, the chart's CRDs and admission policy, docs/api.md (api.py, rules.py, policy.py)
	$(VENV)/bin/kubetune crd

cluster-up: venv  ## start the local cluster (kube-apiserver, etcd, controllers, MinIO, registry, Kueue, a kubelet + containerd node; KUBETUNE_KUEUE=0: no Kueue)
	$(PY) -m devcluster up

cluster-down:  ## stop everything cluster-up started
	$(PY) -m devcluster down

cluster-status:  ## show what runs and where
	$(PY) -m devcluster status

bench: cluster-up  ## trainer on CPU, operator on the local cluster (figures go to docs/benchmarks.md)
	$(PY) -m hack.bench_trainer
	$(PY) -m hack.bench_evaluation
	$(PY) -m hack.bench_preference
	$(PY) -m hack.bench_operator

chaos: venv  ## chaos suite on the local cluster: operator kills, pod kills, MinIO and API outages (figures)
	KUBETUNE_CHAOS=1 $(PY) -m pytest tests/e2e/chaos -s -p no:cacheprovider

gpu-check: venv  ## bf16 / int8 / int4 LoRA and batchSize auto on a real GPU (3.55B shape): memory, tokens/s, census
	$(PY) -m hack.gpu_check

chart-docs: venv  ## regenerate the chart's values.schema.json and README.md from values.yaml
	$(PY) hack/chart_docs.py

demo: venv  ## local cluster + the images + Helm install + MinIO + quickstart FineTuneJob, followed live to its adapter
	$(PY) -m devcluster.demo up

demo-down:  ## uninstall the demo and stop the local cluster
	$(PY) -m devcluster.demo down
