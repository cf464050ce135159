#!/usr/bin/env bash
# Builds the peer operator for operator benchmarks -- Kubeflow's training-operator (the v1
# controller manager, cmd/training-operator.v1) -- from its published Go module, pinned in
# hack/kubeflow/go.mod, into a versioned cache, and prints the binary's path. A second run finds
# it there and builds nothing. Next to the binary it puts the PyTorchJob CRD taken from the same
# module source (manifests/base/crds/kubeflow.org_pytorchjobs.yaml); apply it server-side (it is
# too large for the last-applied annotation of a client-side apply).
#
# Running it outside a cluster (v1.8.1): the webhook server and its cert rotator cannot be turned
# off. The rotator needs an existing Secret `training-operator-webhook-cert` in $MY_POD_NAMESPACE
# (default `kubeflow`), which it fills with a CA and a serving cert, and a tls.crt/tls.key pair in
# the hard-coded /tmp/k8s-webhook-server/serving-certs (which the webhook server, whose directory
# is $TMPDIR/k8s-webhook-server/serving-certs, also serves from; any self-signed pair does). No
# ValidatingWebhookConfiguration is needed: a missing one is logged and skipped, so nothing calls
# the webhook. Then, e.g.:
#   MY_POD_NAMESPACE=<ns> training-operator --kubeconfig=<file> --enable-scheme=pytorchjob \
#     --metrics-bind-address=127.0.0.1:<p1> --health-probe-bind-address=127.0.0.1:<p2> \
#     --webhook-server-port=<p3>
# (no --gang-scheduler-name: gang scheduling stays off; no --leader-elect: off by default).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
module=github.com/kubeflow/training-operator
version=$(awk -v m="$module" '$1 == "require" && $2 == m { print $3 }' "$here/kubeflow/go.mod")
[ -n "$version" ] || { echo "build-peer: no 'require $module' in $here/kubeflow/go.mod" >&2; exit 1; }

cache=${KUBETUNE_CACHE:-$HOME/.cache/kubetune}
bin=$cache/bin/training-operator-$version
mkdir -p "$bin"
# One build at a time per version: a second caller waits, then finds the binary.
exec 9>"$bin/.lock"
flock 9
export GOWORK=off CGO_ENABLED=0 GOFLAGS=-mod=mod
log() { echo "build-peer: $*" >&2; }

if [ ! -x "$bin/training-operator" ]; then
  log "building training-operator $version"
  (cd "$here/kubeflow" && nice -n 19 go build -trimpath -ldflags "-s -w" \
    -o "$bin/training-operator.tmp" "$module/cmd/training-operator.v1")
  mv "$bin/training-operator.tmp" "$bin/training-operator"
fi

crd=kubeflow.org_pytorchjobs.yaml
if [ ! -f "$bin/$crd" ]; then
  dir=$(cd "$here/kubeflow" && go mod download -json "$module@$version" |
    sed -n 's/^[[:space:]]*"Dir": "\(.*\)",\{0,1\}$/\1/p')
  [ -f "$dir/manifests/base/crds/$crd" ] || { log "no $crd under '$dir/manifests/base/crds'"; exit 1; }
  cp "$dir/manifests/base/crds/$crd" "$bin/$crd.tmp"
  chmod 644 "$bin/$crd.tmp"
  mv "$bin/$crd.tmp" "$bin/$crd"
fi

echo "$bin/training-operator"
