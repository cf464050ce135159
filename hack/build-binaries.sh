#!/usr/bin/env bash
# Builds the local cluster's binaries from upstream Go modules into a versioned cache and prints
# the directory. A second run finds them there and builds nothing.
#
#   kube-apiserver, kube-controller-manager, kube-scheduler  <- hack/k8s/go.mod (k8s.io/kubernetes)
#   kubelet, kube-proxy (the node)                           <- the same module
#   etcd                                                     <- hack/etcd/go.mod (go.etcd.io/etcd/server/v3)
#   minio                                                    <- go install github.com/minio/minio@<pinned>
#   registry (into its own bin/registry-<version>/)          <- go install github.com/distribution/distribution/v3/cmd/registry@<pinned>
#   helm (into its own bin/helm-<version>/)                  <- go install helm.sh/helm/v3/cmd/helm@<pinned>
#   coredns (into its own bin/coredns-<version>/)            <- go install github.com/coredns/coredns@<pinned>
#   celeval (into bin/celeval-<hash>/)                       <- hack/k8s/celeval: the API server's CEL
#                                                               environment, for tests/unit/test_rules.py
#
# `build-binaries.sh celeval` builds (or finds) celeval only and prints its path.
# kubectl comes from a pinned PyPI package (see devcluster/tools.py), not from here.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=versions.env
source "$here/versions.env"

cache=${KUBETUNE_CACHE:-$HOME/.cache/kubetune}
bin=$cache/bin/k8s-$KUBERNETES_VERSION-etcd-$ETCD_VERSION-minio-${MINIO_VERSION##*-}
mkdir -p "$bin"
# One build at a time per version set: a second caller waits, then finds the binaries.
exec 9>"$bin/.lock"
flock 9
export GOWORK=off CGO_ENABLED=0 GOFLAGS=-mod=mod
log() { echo "build-binaries: $*" >&2; }

# celeval: CEL in the API server's own environment (k8s.io/apiserver/pkg/cel at the cluster's version).
celeval_dir=$cache/bin/celeval-$(cat "$here/k8s/go.mod" "$here/k8s/go.sum" "$here/k8s/celeval/main.go" | sha256sum | cut -c1-12)
if [ ! -x "$celeval_dir/celeval" ]; then
  log "building celeval"
  mkdir -p "$celeval_dir"
  (cd "$here/k8s" && go build -trimpath -ldflags "-s -w" -o "$celeval_dir/celeval.tmp" ./celeval)
  mv "$celeval_dir/celeval.tmp" "$celeval_dir/celeval"
fi
if [ "${1:-}" = celeval ]; then
  echo "$celeval_dir/celeval"
  exit 0
fi

minor=${KUBERNETES_VERSION#*.}; minor=${minor%%.*}
ldflags="-s -w \
 -X k8s.io/component-base/version.gitVersion=v$KUBERNETES_VERSION \
 -X k8s.io/component-base/version.gitMajor=1 \
 -X k8s.io/component-base/version.gitMinor=$minor \
 -X k8s.io/component-base/version.gitTreeState=clean"
for name in kube-apiserver kube-controller-manager kube-scheduler kubelet kube-proxy; do
  if [ ! -x "$bin/$name" ]; then
    log "building $name v$KUBERNETES_VERSION (slow the first time; cached afterwards)"
    (cd "$here/k8s" && go build -trimpath -ldflags "$ldflags" -o "$bin/$name.tmp" "k8s.io/kubernetes/cmd/$name")
    mv "$bin/$name.tmp" "$bin/$name"
  fi
done

if [ ! -x "$bin/etcd" ]; then
  log "building etcd v$ETCD_VERSION"
  (cd "$here/etcd" && go build -trimpath -ldflags "-s -w" -o "$bin/etcd.tmp" go.etcd.io/etcd/server/v3)
  mv "$bin/etcd.tmp" "$bin/etcd"
fi

# go_install DIR NAME PACKAGE@VERSION [LDFLAGS]: `go install` one command into DIR unless it is there.
go_install() {
  local dir=$1 name=$2 package=$3 ldflags=${4:-"-s -w"} gobin
  [ -x "$dir/$name" ] && return
  log "building $name ($package)"
  mkdir -p "$dir"
  gobin=$(mktemp -d "$dir/.gobin.XXXXXX")
  GOBIN="$gobin" go install -trimpath -ldflags "$ldflags" "$package"
  mv "$gobin/$name" "$dir/$name"
  rmdir "$gobin"
}

go_install "$bin" minio "github.com/minio/minio@$MINIO_VERSION"

# As helm's own Makefile does: stamp the version and the Kubernetes version of its client
# libraries (the default for `helm template` and `helm lint`; 1.20 otherwise).
helm_pkg=helm.sh/helm/v3
go_install "$cache/bin/helm-$HELM_VERSION" helm "$helm_pkg/cmd/helm@v$HELM_VERSION" "-s -w \
  -X $helm_pkg/internal/version.version=v$HELM_VERSION -X $helm_pkg/internal/version.gitTreeState=clean \
  -X $helm_pkg/pkg/chartutil.k8sVersionMajor=1 -X $helm_pkg/pkg/chartutil.k8sVersionMinor=$HELM_K8S_MINOR \
  -X $helm_pkg/pkg/lint/rules.k8sVersionMajor=1 -X $helm_pkg/pkg/lint/rules.k8sVersionMinor=$HELM_K8S_MINOR"

# The loopback image registry, and the real node's cluster DNS.
go_install "$cache/bin/registry-$REGISTRY_VERSION" registry \
  "github.com/distribution/distribution/v3/cmd/registry@$REGISTRY_VERSION"
go_install "$cache/bin/coredns-$COREDNS_VERSION" coredns "github.com/coredns/coredns@$COREDNS_VERSION"

echo "$bin"
