#!/usr/bin/env bash
# Puts KServe's InferenceService and LLMInferenceService CRDs, taken from its published Go module
# (pinned in hack/kserve/go.mod, checked against hack/kserve/go.sum), into a versioned cache and
# prints that directory. A second run finds them there. Apply them server-side: they are too
# large for the last-applied annotation of a client-side apply. tests/e2e/test_examples.py installs
# them for the server-side dry run of examples/serving-kserve.yaml.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
module=github.com/kserve/kserve
version=$(awk -v m="$module" '$1 == "require" && $2 == m { print $3 }' "$here/kserve/go.mod")
[ -n "$version" ] || { echo "kserve-crds: no 'require $module' in $here/kserve/go.mod" >&2; exit 1; }

cache=${KUBETUNE_CACHE:-$HOME/.cache/kubetune}
out=$cache/crds/kserve-$version
mkdir -p "$out"
exec 9>"$out/.lock"
flock 9
export GOWORK=off GOFLAGS=-mod=mod
crds=(serving.kserve.io_inferenceservices.yaml llmisvc/serving.kserve.io_llminferenceservices.yaml)
if [ ! -f "$out/.complete" ]; then
  dir=$(cd "$here/kserve" && go mod download -json "$module@$version" |
    sed -n 's/^[[:space:]]*"Dir": "\(.*\)",\{0,1\}$/\1/p')
  for crd in "${crds[@]}"; do
    [ -f "$dir/config/crd/full/$crd" ] || { echo "kserve-crds: no $crd under '$dir/config/crd/full'" >&2; exit 1; }
    install -m 644 "$dir/config/crd/full/$crd" "$out/$(basename "$crd")"
  done
  touch "$out/.complete"
fi
echo "$out"
