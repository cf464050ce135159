// Builds Kubeflow's training-operator (the v1 controller manager) from its published Go module,
// as a peer operator for benchmarks: see hack/build-peer.sh.
module kubetune.io/hack/kubeflow

go 1.22

require github.com/kubeflow/training-operator v1.8.1
