"""What the containers of a pod see (development and tests only): volumes materialized on the host
(configMap, secret, emptyDir, downwardAPI, projected service-account tokens, PVC, hostPath) and
container environments."""

from __future__ import annotations

import base64
import shutil
import subprocess
import time
from pathlib import Path

from devcluster.kube_http import ApiError, Kube
from devcluster.pod_spec import (
    JSON,
    ConfigError,
    PodError,
    env_name_ok,
    expand,
    field_value,
    parse_quantity,
    resource_value,
    write_file,
)


class PodInputs:
    """Volumes and environments of one pod, resolved against the API."""

    def __init__(self, kube: Kube, pod: JSON, root: Path, pv_dir: Path, allocatable: dict[str, str],
                 base_env: dict[str, str]) -> None:
        self.kube = kube
        self.pod = pod
        self.namespace: str = pod["metadata"]["namespace"]
        self.pod_name: str = pod["metadata"]["name"]
        self.uid: str = pod["metadata"]["uid"]
        self.root = root
        self.pv_dir = pv_dir
        self.allocatable = allocatable
        self.base_env = base_env
        self.volumes: dict[str, Path] = {}
        self.tmpfs_mounts: list[Path] = []
        self.tokens: list[tuple[Path, JSON, float, float]] = []  # (file, request, issued, ttl)

    def release(self) -> None:
        """Unmount the memory-backed volumes."""
        for mount in self.tmpfs_mounts:
            subprocess.run(["umount", "-l", str(mount)], check=False)
        self.tmpfs_mounts.clear()

    def get_object(self, kind: str, name: str, optional: bool) -> JSON | None:
        obj: JSON | None = self.kube.get_or_none(f"/api/v1/namespaces/{self.namespace}/{kind}/{name}")
        if obj is None and not optional:
            raise ConfigError(f"{kind[:-1]} {name!r} not found")
        return obj

    def object_data(self, kind: str, name: str, optional: bool) -> dict[str, bytes]:
        obj = self.get_object(kind, name, optional)
        if obj is None:
            return {}
        if kind == "secrets":
            return {k: base64.b64decode(v) for k, v in (obj.get("data") or {}).items()}
        data = {k: v.encode() for k, v in (obj.get("data") or {}).items()}
        data.update({k: base64.b64decode(v) for k, v in (obj.get("binaryData") or {}).items()})
        return data

    def prepare_volumes(self) -> dict[str, Path]:
        """Materialize every volume of the pod on the host; returns volume name → host path."""
        self.release()
        self.tokens.clear()
        volumes: dict[str, Path] = {}
        root = self.root
        for volume in self.pod["spec"].get("volumes", []):
            name = volume["name"]
            target = root / name
            if "persistentVolumeClaim" in volume:
                claim = volume["persistentVolumeClaim"]["claimName"]
                volumes[name] = self.pv_dir / self.namespace / claim
                volumes[name].mkdir(parents=True, exist_ok=True)
            elif "hostPath" in volume:
                volumes[name] = self.host_path(volume["hostPath"])
            else:
                shutil.rmtree(target, ignore_errors=True)
                target.mkdir(parents=True)
                self.fill_volume(volume, target)
                volumes[name] = target
        return volumes

    def host_path(self, source: JSON) -> Path:
        path = Path(source["path"])
        kind = source.get("type", "")
        if kind == "DirectoryOrCreate":
            path.mkdir(parents=True, exist_ok=True)
        elif kind == "FileOrCreate" and not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.touch()
        elif kind in ("Directory", "File") and not path.exists():
            raise ConfigError(f"hostPath {path} does not exist")
        return path

    def fill_volume(self, volume: JSON, target: Path) -> None:
        if "emptyDir" in volume:
            if volume["emptyDir"].get("medium") == "Memory":
                size = volume["emptyDir"].get("sizeLimit")
                options = ["-o", f"size={int(parse_quantity(size))}"] if size else []
                subprocess.run(["mount", "-t", "tmpfs", *options, "tmpfs", str(target)], check=True)
                self.tmpfs_mounts.append(target)
            return
        mode = 0o644
        if "configMap" in volume:
            source = volume["configMap"]
            mode = source.get("defaultMode", mode)
            self.write_keys(target, self.object_data("configmaps", source["name"], source.get("optional", False)),
                            source.get("items"), mode)
        elif "secret" in volume:
            source = volume["secret"]
            mode = source.get("defaultMode", mode)
            self.write_keys(target, self.object_data("secrets", source["secretName"], source.get("optional", False)),
                            source.get("items"), mode)
        elif "downwardAPI" in volume:
            self.write_downward(target, volume["downwardAPI"].get("items", []), volume["downwardAPI"].get(
                "defaultMode", mode))
        elif "projected" in volume:
            mode = volume["projected"].get("defaultMode", mode)
            for source in volume["projected"].get("sources", []):
                self.fill_projection(target, source, mode)
        else:
            kinds = sorted(set(volume) - {"name"})
            raise PodError(f"volume {volume['name']!r}: unsupported volume type {kinds}")

    def fill_projection(self, target: Path, source: JSON, mode: int) -> None:
        if "serviceAccountToken" in source:
            spec = source["serviceAccountToken"]
            request = {"audiences": [spec["audience"]] if spec.get("audience") else [],
                       "expirationSeconds": spec.get("expirationSeconds", 3600),
                       "boundObjectRef": {"apiVersion": "v1", "kind": "Pod",
                                          "name": self.pod_name, "uid": self.uid}}
            path = target / spec["path"]
            self.write_token(path, request, mode)
        elif "configMap" in source:
            ref = source["configMap"]
            self.write_keys(target, self.object_data("configmaps", ref["name"], ref.get("optional", False)),
                            ref.get("items"), mode)
        elif "secret" in source:
            ref = source["secret"]
            self.write_keys(target, self.object_data("secrets", ref["name"], ref.get("optional", False)),
                            ref.get("items"), mode)
        elif "downwardAPI" in source:
            self.write_downward(target, source["downwardAPI"].get("items", []), mode)
        else:
            raise PodError(f"unsupported projected volume source {sorted(source)}")

    def write_token(self, path: Path, request: JSON, mode: int) -> None:
        account = self.pod["spec"].get("serviceAccountName") or "default"
        body = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": request}
        try:
            answer = self.kube.create(
                f"/api/v1/namespaces/{self.namespace}/serviceaccounts/{account}/token", body)
        except ApiError as error:
            if error.status == 404:
                raise ConfigError(f"service account {account!r} not found") from None
            raise
        write_file(path, answer["status"]["token"].encode(), mode)
        ttl = float(answer["spec"].get("expirationSeconds") or request["expirationSeconds"])
        self.tokens.append((path, request, time.monotonic(), ttl))

    def refresh_tokens(self) -> None:
        """Rotate tokens at 80% of their lifetime, as kubelet does."""
        due = [t for t in self.tokens if time.monotonic() - t[2] > 0.8 * t[3]]
        for token in due:
            self.tokens.remove(token)
            path, request, _, _ = token
            self.write_token(path, request, path.stat().st_mode & 0o777)

    def write_keys(self, target: Path, data: dict[str, bytes], items: list[JSON] | None, mode: int) -> None:
        if items is None:
            for key, value in data.items():
                write_file(target / key, value, mode)
            return
        for item in items:
            if item["key"] not in data:
                raise ConfigError(f"key {item['key']!r} not found")
            write_file(target / item["path"], data[item["key"]], item.get("mode", mode))

    def write_downward(self, target: Path, items: list[JSON], mode: int) -> None:
        for item in items:
            if "fieldRef" in item:
                value = field_value(self.pod, item["fieldRef"]["fieldPath"])
            else:
                ref = item["resourceFieldRef"]
                container = next(c for c in self.pod["spec"]["containers"] if c["name"] == ref["containerName"])
                value = resource_value(container, ref, self.allocatable)
            write_file(target / item["path"], value.encode(), item.get("mode", mode))

    def container_env(self, container: JSON) -> dict[str, str]:
        """The environment a container sees (base, envFrom, env), with `$(VAR)` expansion."""
        env = dict(self.base_env)
        for source in container.get("envFrom", []):
            ref = source.get("configMapRef") or source.get("secretRef") or {}
            kind = "configmaps" if "configMapRef" in source else "secrets"
            for key, raw in self.object_data(kind, ref["name"], ref.get("optional", False)).items():
                name = source.get("prefix", "") + key
                if env_name_ok(name):
                    env[name] = raw.decode(errors="replace")
        for var in container.get("env", []):
            resolved = self.env_value(container, var, env)
            if resolved is not None:
                env[var["name"]] = resolved
        return env

    def env_value(self, container: JSON, var: JSON, env: dict[str, str]) -> str | None:
        if "valueFrom" not in var:
            return expand(var.get("value", ""), env)
        source = var["valueFrom"]
        if "fieldRef" in source:
            return field_value(self.pod, source["fieldRef"]["fieldPath"])
        if "resourceFieldRef" in source:
            return resource_value(container, source["resourceFieldRef"], self.allocatable)
        kind, ref = ("configmaps", source.get("configMapKeyRef")) if "configMapKeyRef" in source else (
            "secrets", source.get("secretKeyRef"))
        if ref is None:
            raise PodError(f"env {var['name']!r}: unsupported valueFrom {sorted(source)}")
        data = self.object_data(kind, ref["name"], ref.get("optional", False))
        if ref["key"] not in data:
            if ref.get("optional"):
                return None
            raise ConfigError(f"key {ref['key']!r} not found in {kind[:-1]} {ref['name']!r}")
        return data[ref["key"]].decode(errors="replace")
