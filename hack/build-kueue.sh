#!/usr/bin/env bash
# Builds Kueue -- its controller manager, cmd/kueue -- from its published Go module, pinned in
# hack/kueue/go.mod, into a versioned cache (~/.cache/kubetune/bin/kueue-<version>/) and prints
# that directory. A second run finds everything there and builds nothing. Next to the binary it
# puts what the local cluster needs from the same module source:
#
#   kueue                  the controller manager (webhooks included)
#   crd/                   config/components/crd: the kueue.x-k8s.io CRDs (bases/) and the
#                          kustomization whose patches say which CRDs convert through the webhook
#   webhooks.yaml          config/components/webhook/manifests.yaml: the (Mutating|Validating)
#                          WebhookConfigurations, pointing at a Service that devcluster/cluster.py
#                          replaces with a loopback URL
#
# devcluster/kueue.py starts it (see `start_kueue` there); the CRDs are large, apply them server-side.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
module=sigs.k8s.io/kueue
version=$(awk -v m="$module" '$1 == "require" && $2 == m { print $3 }' "$here/kueue/go.mod")
[ -n "$version" ] || { echo "build-kueue: no 'require $module' in $here/kueue/go.mod" >&2; exit 1; }

cache=${KUBETUNE_CACHE:-$HOME/.cache/kubetune}
bin=$cache/bin/kueue-$version
mkdir -p "$bin"
# One build at a time per version: a second caller waits, then finds the binary.
exec 9>"$bin/.lock"
flock 9
export GOWORK=off CGO_ENABLED=0 GOFLAGS=-mod=mod
log() { echo "build-kueue: $*" >&2; }

if [ ! -x "$bin/kueue" ]; then
  log "building kueue $version (slow the first time; cached afterwards)"
  # As Kueue's Makefile does: stamp the version (shown in its log and its metrics).
  (cd "$here/kueue" && nice -n 19 go build -trimpath \
    -ldflags "-s -w -X $module/pkg/version.GitVersion=$version" \
    -o "$bin/kueue.tmp" "$module/cmd/kueue")
  mv "$bin/kueue.tmp" "$bin/kueue"
fi

if [ ! -f "$bin/webhooks.yaml" ] || [ ! -d "$bin/crd" ]; then
  dir=$(cd "$here/kueue" && go mod download -json "$module@$version" |
    sed -n 's/^[[:space:]]*"Dir": "\(.*\)",\{0,1\}$/\1/p')
  crd=$dir/config/components/crd
  webhooks=$dir/config/components/webhook/manifests.yaml
  [ -d "$crd/bases" ] && [ -f "$webhooks" ] || { log "no CRDs or webhook manifests under '$dir/config/components'"; exit 1; }
  rm -rf "$bin/crd.tmp"
  cp -r "$crd" "$bin/crd.tmp"
  chmod -R u+w,a+rX "$bin/crd.tmp"
  rm -rf "$bin/crd"
  mv "$bin/crd.tmp" "$bin/crd"
  cp "$webhooks" "$bin/webhooks.yaml.tmp"
  chmod 644 "$bin/webhooks.yaml.tmp"
  mv "$bin/webhooks.yaml.tmp" "$bin/webhooks.yaml"
fi

echo "$bin"
