"""Generate the chart's values.schema.json and README.md from values.yaml and its `# --` comments, and
stamp Chart.yaml's version and appVersion with kubetune_contract.__version__.

    python hack/chart_docs.py           write helm/kubetune/values.schema.json and README.md
    python hack/chart_docs.py --check   exit 1 (naming the file) when a committed file differs

values.yaml is the one place a value is defined, defaulted and described; the schema
(`additionalProperties: false` everywhere but free-form Kubernetes objects) and the README's
values table follow from it. README.md.tmpl holds the prose; `{{ values_table }}` marks the table.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

import yaml

CHART = Path(__file__).resolve().parents[1] / "helm" / "kubetune"

# Kubernetes objects passed through as they are.
FREE_FORM = {"resources", "podSecurityContext", "securityContext", "affinity", "admissionPolicy.namespaceSelector"}
STRING_MAPS = {"nodeSelector", "podLabels", "podAnnotations", "trainer.nodeSelector",
               "serviceAccount.annotations", "serviceMonitor.labels", "prometheusRule.labels",
               "grafanaDashboard.labels"}
PORT = {"type": "integer", "minimum": 1, "maximum": 65535}
OVERRIDES: dict[str, dict[str, Any]] = {
    "image.pullPolicy": {"enum": ["Always", "IfNotPresent", "Never"]},
    # The report endpoint speaks plain HTTP: never expose it through a cloud load balancer.
    "service.type": {"enum": ["ClusterIP", "NodePort"]},
    "networkPolicy.extraIngressFrom": {"items": {"type": "object"}},
    "logLevel": {"enum": ["DEBUG", "INFO", "WARNING", "ERROR"]},
    "watchNamespaces": {"items": {"type": "string", "minLength": 1}},
    "imagePullSecrets": {"items": {"type": "object", "required": ["name"], "additionalProperties": False,
                                   "properties": {"name": {"type": "string", "minLength": 1}}}},
    "tolerations": {"items": {"type": "object"}},
    "reports.port": PORT,
    "trainer.terminationGracePeriodSeconds": {"minimum": 30},
    "healthPort": PORT,
    "reports.statusIntervalSeconds": {"type": "number", "exclusiveMinimum": 0},
    "reports.ratePerSecond": {"type": "number", "exclusiveMinimum": 0},
    "image.repository": {"minLength": 1},
}


def descriptions(text: str) -> dict[str, str]:
    """Dotted key → the `# --` comment above it (continuation `#` lines joined)."""
    found: dict[str, str] = {}
    stack: list[tuple[int, str]] = []
    pending: list[str] | None = None
    for line in text.splitlines():
        comment = re.match(r"^\s*# -- (.*)$", line)
        if comment:
            pending = [comment.group(1)]
            continue
        more = re.match(r"^\s*#\s?(.*)$", line)
        if more and pending is not None:
            pending.append(more.group(1))
            continue
        key = re.match(r"^(\s*)([A-Za-z0-9_]+):", line)
        if key:
            indent = len(key.group(1))
            while stack and stack[-1][0] >= indent:
                stack.pop()
            path = ".".join([k for _, k in stack] + [key.group(2)])
            stack.append((indent, key.group(2)))
            if pending is not None:
                found[path] = " ".join(pending).strip()
        pending = None
    return found


def schema_for(path: str, value: Any, docs: dict[str, str]) -> dict[str, Any]:
    if path not in docs:
        raise SystemExit(f"values.yaml: {path} has no `# --` description")
    node: dict[str, Any] = {"description": docs[path], "default": value}
    name = path.rsplit(".", 1)[-1]
    if path in FREE_FORM or name in FREE_FORM:
        node["type"] = "object"
    elif path in STRING_MAPS:
        node.update(type="object", additionalProperties={"type": "string"})
    elif isinstance(value, dict):
        node.update(type="object", additionalProperties=False,
                    properties={k: schema_for(f"{path}.{k}", v, docs) for k, v in value.items()})
        del node["default"]
    elif isinstance(value, bool):
        node["type"] = "boolean"
    elif isinstance(value, int):
        node["type"] = "integer"
    elif isinstance(value, float):
        node["type"] = "number"
    elif isinstance(value, list):
        node["type"] = "array"
    else:
        node["type"] = "string"
    node.update(OVERRIDES.get(path, {}))
    return node


def build_schema(values_text: str) -> dict[str, Any]:
    values = yaml.safe_load(values_text)
    docs = descriptions(values_text)
    return {
        "$schema": "https://json-schema.org/draft-07/schema#",
        "title": "KubeTune chart values",
        "type": "object",
        "additionalProperties": False,
        "properties": {k: schema_for(k, v, docs) for k, v in values.items()},
    }


def rows(properties: dict[str, Any], prefix: str = "") -> list[str]:
    out = []
    for key, node in properties.items():
        path = f"{prefix}{key}"
        if "properties" in node:
            out += rows(node["properties"], f"{path}.")
            continue
        default = json.dumps(node.get("default"))
        kind = node["type"] + (f" ({' / '.join(node['enum'])})" if "enum" in node else "")
        text = node["description"].replace("|", "\\|")
        out.append(f"| `{path}` | {kind} | `{default}` | {text} |")
    return out


def build_readme(schema: dict[str, Any], template: str) -> str:
    table = "\n".join(["| Key | Type | Default | Description |", "|---|---|---|---|", *rows(schema["properties"])])
    return template.replace("{{ values_table }}", table)


def project_version() -> str:
    """kubetune_contract.__version__, the one source of the version."""
    text = (CHART.parents[1] / "contract" / "kubetune_contract" / "__init__.py").read_text()
    found = re.search(r'^__version__ = "([^"]+)"$', text, re.MULTILINE)
    if not found:
        raise SystemExit("contract/kubetune_contract/__init__.py: no __version__ line")
    return found.group(1)


def stamp_version(chart_yaml: str, version: str) -> str:
    """Chart.yaml with version and appVersion set to the project's version (chart and app ship together)."""
    chart_yaml = re.sub(r"^version: .*$", f"version: {version}", chart_yaml, count=1, flags=re.MULTILINE)
    return re.sub(r"^appVersion: .*$", f'appVersion: "{version}"', chart_yaml, count=1, flags=re.MULTILINE)


def generated() -> dict[Path, str]:
    values_text = (CHART / "values.yaml").read_text()
    schema = build_schema(values_text)
    return {
        CHART / "Chart.yaml": stamp_version((CHART / "Chart.yaml").read_text(), project_version()),
        CHART / "values.schema.json": json.dumps(schema, indent=2) + "\n",
        CHART / "README.md": build_readme(schema, (CHART / "README.md.tmpl").read_text()),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args()
    stale = []
    for path, text in generated().items():
        if args.check:
            if not path.exists() or path.read_text() != text:
                stale.append(path)
        else:
            path.write_text(text)
    for path in stale:
        print(f"{path}: differs from values.yaml; run `make chart-docs`", file=sys.stderr)
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
