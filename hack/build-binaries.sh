#!/usr/bin/env bash
# Builds the local cluster's binaries from upstream Go modules into a versioned cache and prints
# the directory. A second run finds them there and builds nothing.
#
#   kube-apiserver, kube-controller-manager, kube-scheduler  <- hack/k8s/go.mod (k8s.io/kubernetes)
#   kubelet, kube-proxy (the real node, KUBETUNE_NODE=kubelet) <- the same module
#   etcd                                                     <- hack/etcd/go.mod (go.etcd.io/etcd/server/v3)
#   minio                                                    <- go install github.com/minio/minio@<pinned>
#   registry (into its own bin/registry-<version>/)          <- go install github.com/distribution/distribution/v3/cmd/registry@<pinned>
#   helm (into its own bin/helm-<version>/)                  <- go install helm.sh/helm/v3/cmd/helm@<pinned>
#   coredns (into its own bin/coredns-<version>/)            <- go install github.com/coredns/coredns@<pinned>
#
# kubectl comes from a pinned PyPI package (see hack/tools.py), not from here.
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

if [ ! -x "$bin/minio" ]; then
  log "building minio $MINIO_VERSION"
  gobin=$(mktemp -d "$bin/.gobin.XXXXXX")
  GOBIN="$gobin" go install -trimpath -ldflags "-s -w" "github.com/minio/minio@$MINIO_VERSION"
  mv "$gobin/minio" "$bin/minio"
  rmdir "$gobin"
fi

helm_bin=$cache/bin/helm-$HELM_VERSION
if [ ! -x "$helm_bin/helm" ]; then
  log "building helm v$HELM_VERSION"
  mkdir -p "$helm_bin"
  gobin=$(mktemp -d "$helm_bin/.gobin.XXXXXX")
  # As helm's own Makefile does: stamp the version and the Kubernetes version of its client
  # libraries (the default for `helm template` and `helm lint`; 1.20 otherwise).
  helm_pkg=helm.sh/helm/v3
  GOBIN="$gobin" go install -trimpath -ldflags "-s -w \
    -X $helm_pkg/internal/version.version=v$HELM_VERSION -X $helm_pkg/internal/version.gitTreeState=clean \
    -X $helm_pkg/pkg/chartutil.k8sVersionMajor=1 -X $helm_pkg/pkg/chartutil.k8sVersionMinor=$HELM_K8S_MINOR \
    -X $helm_pkg/pkg/lint/rules.k8sVersionMajor=1 -X $helm_pkg/pkg/lint/rules.k8sVersionMinor=$HELM_K8S_MINOR" \
    "$helm_pkg/cmd/helm@v$HELM_VERSION"
  mv "$gobin/helm" "$helm_bin/helm"
  rmdir "$gobin"
fi

registry_bin=$cache/bin/registry-$REGISTRY_VERSION
if [ ! -x "$registry_bin/registry" ]; then
  log "building the distribution registry $REGISTRY_VERSION (the loopback image registry)"
  mkdir -p "$registry_bin"
  gobin=$(mktemp -d "$registry_bin/.gobin.XXXXXX")
  GOBIN="$gobin" go install -trimpath -ldflags "-s -w" \
    "github.com/distribution/distribution/v3/cmd/registry@$REGISTRY_VERSION"
  mv "$gobin/registry" "$registry_bin/registry"
  rmdir "$gobin"
fi

coredns_bin=$cache/bin/coredns-$COREDNS_VERSION
if [ ! -x "$coredns_bin/coredns" ]; then
  log "building coredns $COREDNS_VERSION (the real node's cluster DNS)"
  mkdir -p "$coredns_bin"
  gobin=$(mktemp -d "$coredns_bin/.gobin.XXXXXX")
  GOBIN="$gobin" go install -trimpath -ldflags "-s -w" "github.com/coredns/coredns@$COREDNS_VERSION"
  mv "$gobin/coredns" "$coredns_bin/coredns"
  rmdir "$gobin"
fi

echo "$bin"
