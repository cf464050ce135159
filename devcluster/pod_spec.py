"""Pure pieces of the local node agent (development and tests only): downward API, env expansion,
quantities, small file and process helpers."""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import math
import os
import re
import signal
from pathlib import Path
from typing import Any

JSON = dict[str, Any]
POD_IP = "127.0.0.1"  # every pod shares the host's loopback network


def now_iso() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def now_micro() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def process_start_ticks(pid: int) -> int | None:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return None if fields[0] == "Z" else int(fields[19])


def signal_group(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


class ConfigError(Exception):
    """A referenced object is missing; kubelet keeps the pod Pending and retries."""


class PodError(Exception):
    """The pod cannot run here; it is marked Failed with this message."""


# --------------------------------------------------------------------------------------------
# Pure helpers: env, downward API, quantities


_VAR_REF = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.\-]*)\)")


def expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes `$(VAR)` expansion: known variables are replaced, `$$` escapes, others stay."""

    def replace(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name = match.group(1)
        return env.get(name, match.group(0))

    return _VAR_REF.sub(replace, text)


def field_value(pod: JSON, path: str) -> str:
    """Value of a downward-API fieldRef."""
    meta = pod["metadata"]
    match = re.fullmatch(r"metadata\.(labels|annotations)\['(.+)'\]", path)
    if match:
        return str(meta.get(match.group(1), {}).get(match.group(2), ""))
    if path in ("metadata.labels", "metadata.annotations"):
        items = meta.get(path.split(".")[1], {})
        return "\n".join(f"{k}={json.dumps(v)}" for k, v in sorted(items.items()))
    simple = {
        "metadata.name": meta["name"],
        "metadata.namespace": meta["namespace"],
        "metadata.uid": meta["uid"],
        "spec.nodeName": pod["spec"].get("nodeName", ""),
        "spec.serviceAccountName": pod["spec"].get("serviceAccountName", "default"),
        "status.podIP": POD_IP,
        "status.podIPs": POD_IP,
        "status.hostIP": POD_IP,
        "status.hostIPs": POD_IP,
    }
    if path not in simple:
        raise PodError(f"unsupported fieldRef {path!r}")
    return str(simple[path])


def parse_quantity(value: str | int | float) -> float:
    """A Kubernetes quantity as a number (binary and decimal suffixes, milli)."""
    text = str(value)
    suffixes = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60,
                "n": 1e-9, "u": 1e-6, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15, "E": 1e18}
    for suffix in sorted(suffixes, key=len, reverse=True):
        if text.endswith(suffix):
            return float(text[: -len(suffix)]) * suffixes[suffix]
    return float(text)


def resource_value(container: JSON, ref: JSON, node_allocatable: dict[str, str]) -> str:
    """Value of a resourceFieldRef: the limit (node allocatable if none) or request, over the divisor."""
    kind, _, resource = ref["resource"].partition(".")
    resources = container.get("resources", {})
    amount = resources.get(kind, {}).get(resource)
    if amount is None and kind == "limits":
        amount = node_allocatable.get(resource, "0")
    if amount is None:
        amount = "0"
    divisor = parse_quantity(ref.get("divisor", "1"))
    return str(math.ceil(parse_quantity(amount) / divisor))


def env_name_ok(name: str) -> bool:
    return re.fullmatch(r"[-._a-zA-Z][-._a-zA-Z0-9]*", name) is not None


def resource_version(obj: JSON) -> int:
    """etcd revision of an object; comparable on this single-etcd cluster."""
    return int(obj["metadata"].get("resourceVersion") or 0)


def write_file(path: Path, data: bytes, mode: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    path.chmod(mode)
