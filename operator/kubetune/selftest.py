"""`kubetune selftest`: prove that a running operator reconciles (the chart's `helm test`).

It creates a FineTuneJob that the API server accepts but the operator must reject (a GPU of 0
bytes: the schema checks the quantity's form, the operator its value), waits until the operator
marks it Failed with reason InvalidSpec, and deletes it. It needs no GPU, no storage and no trainer
image.
"""

from __future__ import annotations

import secrets
import sys
import time
from typing import Any

from kubetune import api


def selftest(namespace: str, timeout: float) -> int:
    from kubetune.kube import Kube, load_config

    load_config()
    kube = Kube()
    custom = kube.custom
    name = f"kubetune-selftest-{secrets.token_hex(3)}"
    body: dict[str, Any] = {
        "apiVersion": f"{api.GROUP}/{api.VERSION}",
        "kind": api.KIND,
        "metadata": {"name": name, "labels": {"app.kubernetes.io/part-of": "kubetune"}},
        "spec": {
            "model": {"source": "s3://selftest/model/"},
            "dataset": {"train": "s3://selftest/train.jsonl"},
            "output": {"location": "s3://selftest/"},
            "resources": {"gpus": 0, "gpuMemory": "0Gi"},
        },
    }
    custom.create_namespaced_custom_object(api.GROUP, api.VERSION, namespace, api.PLURAL, body)
    print(f"created FineTuneJob {namespace}/{name}; waiting for the operator to reject it", flush=True)
    deadline = time.monotonic() + timeout
    status: dict[str, Any] = {}
    try:
        while time.monotonic() < deadline:
            status = (kube.get_finetunejob(namespace, name) or {}).get("status") or {}
            if status.get("phase") == "Failed" and status.get("reason") == "InvalidSpec":
                print(f"ok: the operator reconciled it: {status.get('message')}", flush=True)
                return 0
            time.sleep(1)
    finally:
        custom.delete_namespaced_custom_object(api.GROUP, api.VERSION, namespace, api.PLURAL, name)
    print(f"FAILED: no InvalidSpec status after {timeout:.0f}s (status: {status or 'none'}); "
          "is the operator running and watching this namespace?", file=sys.stderr)
    return 1
