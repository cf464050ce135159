// Builds Kueue (its controller manager, cmd/kueue) from its published Go module, for the local
// cluster: see hack/build-kueue.sh.
module kubetune.io/hack/kueue

go 1.25.0

require sigs.k8s.io/kueue v0.17.0
