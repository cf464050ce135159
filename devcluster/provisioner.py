"""The local cluster's storage: a default StorageClass ``kubetune-local`` and a provisioner that
binds each pending claim of it to a hostPath PersistentVolume below ``--pv-dir`` (one node, so
hostPath is the node's disk) and deletes released volumes with their data.

    python -m devcluster.provisioner --kubeconfig KUBECONFIG --pv-dir DIR

`python -m devcluster up` starts it as one of the cluster's processes.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import shutil
import signal
import threading
from pathlib import Path
from typing import Any, cast

from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

STORAGE_CLASS = "kubetune-local"
PROVISIONER = "kubetune.io/local-path"
POLL_S = 2.0
log = logging.getLogger("provisioner")


def items(response: Any) -> list[dict[str, Any]]:
    """The items of a list answer read raw (no model objects)."""
    found: list[dict[str, Any]] = json.loads(response.data)["items"]
    return found


class Provisioner:
    def __init__(self, api: client.ApiClient, pv_dir: Path) -> None:
        self.core, self.storage, self.pv_dir = client.CoreV1Api(api), client.StorageV1Api(api), pv_dir

    def ensure_storage_class(self) -> None:
        body: dict[str, Any] = {
            "apiVersion": "storage.k8s.io/v1", "kind": "StorageClass",
            "metadata": {"name": STORAGE_CLASS, "annotations": {"storageclass.kubernetes.io/is-default-class": "true"}},
            "provisioner": PROVISIONER, "reclaimPolicy": "Delete", "volumeBindingMode": "Immediate",
        }
        try:
            self.storage.create_storage_class(cast(Any, body), _request_timeout=30)
        except ApiException as error:
            if error.status != 409:
                raise

    def loop(self, stopping: threading.Event) -> None:
        """Bind pending claims of our class to hostPath PVs; delete released ones (polling)."""
        while not stopping.wait(POLL_S):
            try:
                self.provision_once()
            except Exception as error:
                log.warning("provisioner: %s", error)

    def provision_once(self) -> None:
        claims = self.core.list_persistent_volume_claim_for_all_namespaces(_preload_content=False, _request_timeout=30)
        for claim in items(claims):
            meta, spec = claim["metadata"], claim["spec"]
            if spec.get("storageClassName") != STORAGE_CLASS or spec.get("volumeName"):
                continue
            if claim.get("status", {}).get("phase") != "Pending" or meta.get("deletionTimestamp"):
                continue
            directory = self.pv_dir / meta["namespace"] / meta["name"]
            directory.mkdir(parents=True, exist_ok=True)
            directory.chmod(0o777)  # any pod user may write, as on a fresh volume of most provisioners
            volume: dict[str, Any] = {
                "apiVersion": "v1", "kind": "PersistentVolume",
                "metadata": {"name": f"pvc-{meta['uid']}",
                             "annotations": {"pv.kubernetes.io/provisioned-by": PROVISIONER}},
                "spec": {
                    "capacity": {"storage": spec.get("resources", {}).get("requests", {}).get("storage", "1Gi")},
                    "accessModes": spec.get("accessModes", ["ReadWriteOnce"]),
                    "persistentVolumeReclaimPolicy": "Delete", "storageClassName": STORAGE_CLASS,
                    "hostPath": {"path": str(directory), "type": "DirectoryOrCreate"},
                    "claimRef": {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "namespace": meta["namespace"],
                                 "name": meta["name"], "uid": meta["uid"]},
                },
            }
            with contextlib.suppress(ApiException):
                self.core.create_persistent_volume(cast(Any, volume), _request_timeout=30)
        for volume in items(self.core.list_persistent_volume(_preload_content=False, _request_timeout=30)):
            annotations = volume["metadata"].get("annotations", {})
            if annotations.get("pv.kubernetes.io/provisioned-by") != PROVISIONER:
                continue
            if volume.get("status", {}).get("phase") in ("Released", "Failed"):
                shutil.rmtree(volume["spec"]["hostPath"]["path"], ignore_errors=True)
                with contextlib.suppress(ApiException):
                    self.core.delete_persistent_volume(volume["metadata"]["name"], _request_timeout=30)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="the local cluster's hostPath volume provisioner")
    parser.add_argument("--kubeconfig", type=Path, required=True)
    parser.add_argument("--pv-dir", type=Path, required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    api = config.new_client_from_config(config_file=str(args.kubeconfig))  # type: ignore[no-untyped-call]
    provisioner = Provisioner(api, args.pv_dir)
    provisioner.ensure_storage_class()
    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    signal.signal(signal.SIGINT, lambda *_: stopping.set())
    log.info("provisioning claims of StorageClass %s into %s", STORAGE_CLASS, args.pv_dir)
    provisioner.loop(stopping)


if __name__ == "__main__":
    main()
