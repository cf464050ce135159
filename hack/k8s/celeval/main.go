// celeval evaluates CEL expressions in the Kubernetes API server's own CEL environment (the
// libraries of k8s.io/apiserver/pkg/cel at this module's version): the environment of CRD
// x-kubernetes-validations and of ValidatingAdmissionPolicy expressions.
//
// Reads a JSON array of requests on stdin and writes a JSON array of results on stdout:
//
//	request: {"expression": "...", "activation": {"self": ..., "object": ...},
//	          "variables": [["name", "expression"], ...]}
//	result:  {"value": <bool|string|number|null>} or {"error": "..."}
//
// The variables are evaluated in order, as an admission policy's spec.variables are, and each is
// visible to the next and to the expression as variables.<name>. Every top-level name is dyn.
package main

import (
	"bytes"
	"encoding/json"
	"fmt"
	"os"

	"github.com/google/cel-go/cel"
	"github.com/google/cel-go/common/types"
	"github.com/google/cel-go/common/types/ref"

	"k8s.io/apiserver/pkg/cel/environment"
)

type request struct {
	Expression string          `json:"expression"`
	Activation json.RawMessage `json:"activation"`
	Variables  [][2]string     `json:"variables"`
}

type result struct {
	Value any    `json:"value"`
	Error string `json:"error,omitempty"`
}

var names = []string{"self", "oldSelf", "object", "oldObject", "params", "namespaceObject", "request", "variables"}

func main() {
	var requests []request
	if err := json.NewDecoder(os.Stdin).Decode(&requests); err != nil {
		fmt.Fprintln(os.Stderr, "celeval: reading requests:", err)
		os.Exit(2)
	}
	opts := make([]cel.EnvOption, 0, len(names))
	for _, name := range names {
		opts = append(opts, cel.Variable(name, cel.DynType))
	}
	env, err := environment.MustBaseEnvSet(environment.DefaultCompatibilityVersion()).StoredExpressionsEnv().Extend(opts...)
	if err != nil {
		fmt.Fprintln(os.Stderr, "celeval:", err)
		os.Exit(2)
	}
	results := make([]result, len(requests))
	for i, r := range requests {
		results[i] = evaluate(env, r)
	}
	if err := json.NewEncoder(os.Stdout).Encode(results); err != nil {
		fmt.Fprintln(os.Stderr, "celeval: writing results:", err)
		os.Exit(2)
	}
}

func evaluate(env *cel.Env, r request) result {
	activation := map[string]any{}
	if len(r.Activation) > 0 {
		decoder := json.NewDecoder(bytes.NewReader(r.Activation))
		decoder.UseNumber()
		var raw map[string]any
		if err := decoder.Decode(&raw); err != nil {
			return result{Error: "activation: " + err.Error()}
		}
		for k, v := range raw {
			activation[k] = numbers(v)
		}
	}
	variables := map[string]any{}
	activation["variables"] = variables
	for _, v := range r.Variables {
		val, err := eval(env, v[1], activation)
		if err != nil {
			return result{Error: fmt.Sprintf("variables.%s: %v", v[0], err)}
		}
		variables[v[0]] = val
	}
	val, err := eval(env, r.Expression, activation)
	if err != nil {
		return result{Error: err.Error()}
	}
	native, err := plain(val)
	if err != nil {
		return result{Error: err.Error()}
	}
	return result{Value: native}
}

func eval(env *cel.Env, expression string, activation map[string]any) (ref.Val, error) {
	ast, issues := env.Compile(expression)
	if issues != nil && issues.Err() != nil {
		return nil, issues.Err()
	}
	program, err := env.Program(ast)
	if err != nil {
		return nil, err
	}
	val, _, err := program.Eval(activation)
	return val, err
}

// numbers turns JSON numbers into int64 where integral (as the API server's CEL sees them), else float64.
func numbers(v any) any {
	switch t := v.(type) {
	case json.Number:
		if i, err := t.Int64(); err == nil {
			return i
		}
		f, _ := t.Float64()
		return f
	case map[string]any:
		for k, x := range t {
			t[k] = numbers(x)
		}
	case []any:
		for i, x := range t {
			t[i] = numbers(x)
		}
	}
	return v
}

func plain(val ref.Val) (any, error) {
	switch val.Type() {
	case types.BoolType, types.StringType, types.IntType, types.DoubleType, types.NullType:
		return val.Value(), nil
	}
	return nil, fmt.Errorf("result of type %s: only bool, string, int, double and null are returned", val.Type().TypeName())
}
