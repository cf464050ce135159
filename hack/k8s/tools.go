//go:build tools

// Package tools pins nothing by itself; the binaries are built with
// `go build k8s.io/kubernetes/cmd/<name>` against this module's go.mod.
package tools
