// Pins KServe's published Go module for its CRDs (config/crd/full): tests/e2e apply the
// InferenceService and LLMInferenceService CRDs so that examples/serving-kserve.yaml gets a real
// server-side dry run; see hack/kserve-crds.sh. Nothing is built from it.
module kubetune.io/hack/kserve

go 1.22

require github.com/kserve/kserve v0.16.0
