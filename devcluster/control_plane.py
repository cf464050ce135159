"""The control plane of the local cluster, each component a process of its own with its flags:
etcd, MinIO, the image registry, kube-apiserver, kube-controller-manager and kube-scheduler."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from devcluster import CLUSTER_NAME, SERVICE_CIDR
from devcluster.binaries import Binaries, registry_storage
from devcluster.processes import Paths, State, start_process


def start_etcd(binaries: Binaries, paths: Paths, state: State) -> None:
    client, peer = f"http://127.0.0.1:{state.ports['etcd']}", f"http://127.0.0.1:{state.ports['etcd-peer']}"
    start_process("etcd", [
        str(binaries.etcd), "--name=default", f"--data-dir={paths.data / 'etcd'}",
        f"--listen-client-urls={client}", f"--advertise-client-urls={client}",
        f"--listen-peer-urls={peer}", f"--initial-advertise-peer-urls={peer}",
        f"--initial-cluster=default={peer}", "--initial-cluster-state=new",
        # A throwaway test cluster: durability is not worth the fsync latency.
        "--unsafe-no-fsync", "--log-level=warn",
    ], paths, state)


def start_minio(binaries: Binaries, paths: Paths, state: State, user: str, password: str) -> None:
    # Pods on the node's pod network reach MinIO at the node's own address: listen there too.
    start_process("minio", [
        str(binaries.minio), "server", str(paths.data / "minio"), "--quiet",
        f"--address=:{state.ports['minio']}",
        f"--console-address=127.0.0.1:{state.ports['minio-console']}",
    ], paths, state, env={
        "MINIO_ROOT_USER": user, "MINIO_ROOT_PASSWORD": password, "MINIO_BROWSER": "off",
        "MINIO_UPDATE": "off", "HOME": str(paths.data / "minio-home"),
    })


def registry_config(state: State, storage: Path) -> dict[str, Any]:
    """The distribution registry's configuration: plain HTTP, blobs on disk. It listens on every
    address of this machine, as MinIO does: the node's containerd pulls at 127.0.0.1, pods push
    output.oci artifacts at the node's own address."""
    return {
        "version": 0.1,
        "log": {"level": "warn", "accesslog": {"disabled": True}},
        "storage": {"filesystem": {"rootdirectory": str(storage)}, "delete": {"enabled": True}},
        "http": {"addr": ":" + state.registry.rsplit(":", 1)[1]},
    }


def start_registry(binaries: Binaries, paths: Paths, state: State) -> None:
    """The image registry (plain HTTP): `make images` pushes there, the real node pulls, jobs push
    their output.oci artifacts."""
    storage = registry_storage()
    storage.mkdir(parents=True, exist_ok=True)
    config = paths.data / "registry.yaml"
    config.write_text(json.dumps(registry_config(state, storage), indent=2) + "\n")  # JSON is YAML
    start_process("registry", [str(binaries.registry), "serve", str(config)], paths, state,
                  env={"OTEL_TRACES_EXPORTER": "none"})


def start_apiserver(binaries: Binaries, paths: Paths, state: State) -> None:
    pki = paths.pki
    # Pods reach the apiserver through the `kubernetes` Service (kube-proxy), whose endpoint the lease
    # reconciler (the default) keeps at the node address. It serves there and on loopback (all
    # addresses: the kubeconfigs keep 127.0.0.1).
    serving = ["--bind-address=0.0.0.0", f"--advertise-address={state.node_ip}"]
    start_process("kube-apiserver", [
        str(binaries.kube_apiserver),
        f"--etcd-servers=http://127.0.0.1:{state.ports['etcd']}",
        *serving,
        f"--secure-port={state.ports['apiserver']}",
        f"--tls-cert-file={pki / 'apiserver.crt'}", f"--tls-private-key-file={pki / 'apiserver.key'}",
        f"--client-ca-file={pki / 'ca.crt'}",
        "--authorization-mode=Node,RBAC",
        "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
        f"--service-account-key-file={pki / 'sa.pub'}",
        f"--service-account-signing-key-file={pki / 'sa.key'}",
        f"--service-cluster-ip-range={SERVICE_CIDR}",
        # The defaults (NamespaceLifecycle, LimitRanger, ServiceAccount, PodSecurity, Priority,
        # DefaultStorageClass, ResourceQuota, webhooks, ...) plus NodeRestriction, as kubeadm does.
        # OwnerReferencesPermissionEnforcement is on in OpenShift: children with blockOwnerDeletion
        # need update on finetunejobs/finalizers, which the chart's RBAC must grant.
        "--enable-admission-plugins=NodeRestriction,OwnerReferencesPermissionEnforcement",
        "--allow-privileged=true",
        # `kubectl logs` and `exec` reach the kubelet on the node's InternalIP.
        "--kubelet-preferred-address-types=InternalIP",
        # logs/exec/port-forward: the apiserver authenticates to the kubelet with its own client
        # certificate (allowed by RBAC: ClusterRole system:kubelet-api-admin).
        f"--kubelet-client-certificate={pki / 'kubelet-client.crt'}",
        f"--kubelet-client-key={pki / 'kubelet-client.key'}",
        f"--kubelet-certificate-authority={pki / 'ca.crt'}",
        "--profiling=false", "--event-ttl=1h",
    ], paths, state)


def start_controllers(binaries: Binaries, paths: Paths, state: State) -> None:
    pki = paths.pki
    serving = [f"--tls-cert-file={pki / 'apiserver.crt'}", f"--tls-private-key-file={pki / 'apiserver.key'}"]
    cm_kubeconfig = str(pki / "controller-manager.kubeconfig")
    start_process("kube-controller-manager", [
        str(binaries.kube_controller_manager),
        f"--kubeconfig={cm_kubeconfig}", f"--authentication-kubeconfig={cm_kubeconfig}",
        f"--authorization-kubeconfig={cm_kubeconfig}",
        "--leader-elect=false", "--bind-address=127.0.0.1",
        f"--secure-port={state.ports['controller-manager']}", *serving,
        f"--service-account-private-key-file={pki / 'sa.key'}", f"--root-ca-file={pki / 'ca.crt'}",
        "--use-service-account-credentials=true",
        f"--cluster-signing-cert-file={pki / 'ca.crt'}", f"--cluster-signing-key-file={pki / 'ca.key'}",
        f"--service-cluster-ip-range={SERVICE_CIDR}", f"--cluster-name={CLUSTER_NAME}",
        "--profiling=false",
    ], paths, state)
    sched_kubeconfig = str(pki / "scheduler.kubeconfig")
    start_process("kube-scheduler", [
        str(binaries.kube_scheduler),
        f"--kubeconfig={sched_kubeconfig}", f"--authentication-kubeconfig={sched_kubeconfig}",
        f"--authorization-kubeconfig={sched_kubeconfig}",
        "--leader-elect=false", "--bind-address=127.0.0.1",
        f"--secure-port={state.ports['scheduler']}", *serving, "--profiling=false",
    ], paths, state)
