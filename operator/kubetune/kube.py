"""Thin Kubernetes client helpers: create-or-adopt children, read them, patch status, post events."""

from __future__ import annotations

import json
import logging
import urllib.parse
from collections.abc import Callable
from typing import Any, cast

from kubernetes import client
from kubernetes.client.exceptions import ApiException

from kubetune import api, kueue, metrics, presets
from kubetune.render import config_map_name, job_name
from kubetune_contract.events import now

Json = dict[str, Any]
log = logging.getLogger("kubetune.kube")


class NotOwned(Exception):
    """A child with our deterministic name exists but belongs to someone else."""

    def __init__(self, what: str) -> None:
        super().__init__(f"{what} already exists and is not owned by this FineTuneJob")
        self.what = what


def api_message(exc: ApiException) -> str:
    """The API server's own message of an error (e.g. which RBAC rule is missing)."""
    try:
        return str(json.loads(exc.body or "{}").get("message") or exc.reason)
    except ValueError:
        return str(exc.reason)


def load_config() -> None:
    """In a pod: its service account; elsewhere: the current kubeconfig."""
    from kubernetes import config

    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()


CONNECT_TIMEOUT = 5.0
POOL_SIZE = 32  # kept-alive connections: more than kopf's worker threads, so none waits for one


def resource_of(url: str) -> str:
    """'jobs', 'finetunejobs/status'...: the resource (and subresource) a request URL names."""
    parts = urllib.parse.urlsplit(url).path.strip("/").split("/")
    if "namespaces" in parts[:-1]:
        rest = parts[parts.index("namespaces") + 2:]
        if not rest:
            return "namespaces"
    else:
        rest = parts[2:] if parts[:1] == ["api"] else parts[3:]
    if not rest:
        return "-"
    return f"{rest[0]}/{rest[2]}" if len(rest) > 2 else rest[0]


def count_requests(api_client: client.ApiClient) -> None:
    """Count every request of this client in kubetune_api_requests_total."""
    rest = api_client.rest_client
    send = rest.request

    def counted(method: str, url: str, *args: Any, **kwargs: Any) -> Any:
        metrics.API_REQUESTS.labels(verb=method, resource=resource_of(url)).inc()
        return send(method, url, *args, **kwargs)

    rest.request = counted  # type: ignore[method-assign]


class Kube:
    """The few API calls the operator makes, with plain dicts in and out.

    Every call carries a request timeout (connect, read): a half-open connection to the API server
    fails the call after `timeout` seconds instead of parking a worker thread forever.
    """

    def __init__(self, api_client: client.ApiClient | None = None, timeout: float = 30.0) -> None:
        self.timeout = (min(CONNECT_TIMEOUT, timeout), timeout)
        if api_client is None:
            configuration = client.Configuration.get_default_copy()
            configuration.retries = 1  # one retry on a fresh connection; then the caller decides
            configuration.connection_pool_maxsize = POOL_SIZE
            api_client = client.ApiClient(configuration)
            count_requests(api_client)
        self.client = api_client
        self.core = client.CoreV1Api(self.client)
        self.batch = client.BatchV1Api(self.client)
        self.custom = client.CustomObjectsApi(self.client)
        self.networking = client.NetworkingV1Api(self.client)

    def _json(self, call: Callable[..., Any], *args: Any, **kwargs: Any) -> Json:
        """Call a typed API method and return its response as plain JSON, skipping the client's model
        classes (a round trip through them costs more CPU than the request itself)."""
        response = call(*args, _preload_content=False, _request_timeout=self.timeout, **kwargs)
        result: Json = json.loads(response.data)
        return result

    # --- FineTuneJobs -------------------------------------------------------------------------

    @staticmethod
    def _found(read: Callable[[], Any]) -> Json | None:
        """The object `read` returns, or None when the API server answers 404."""
        try:
            return cast(Json, read())
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def get_finetunejob(self, namespace: str, name: str) -> Json | None:
        return self._found(lambda: self.custom.get_namespaced_custom_object(
            api.GROUP, api.VERSION, namespace, api.PLURAL, name, _request_timeout=self.timeout))

    # --- presets ------------------------------------------------------------------------------

    def get_namespace(self, name: str) -> Json | None:
        return self._found(lambda: self._json(self.core.read_namespace, name))

    def get_preset(self, kind: str, namespace: str, name: str) -> Json | None:
        """A FineTunePreset in `namespace`, or a ClusterFineTunePreset; None when it does not exist."""
        plural = presets.PLURALS[kind]
        if kind == presets.CLUSTER_KIND:
            return self._found(lambda: self.custom.get_cluster_custom_object(
                api.GROUP, api.VERSION, plural, name, _request_timeout=self.timeout))
        return self._found(lambda: self.custom.get_namespaced_custom_object(
            api.GROUP, api.VERSION, namespace, plural, name, _request_timeout=self.timeout))

    def patch_status(self, namespace: str, name: str, status: Json) -> None:
        """Merge-patch the status subresource; keys set to None are removed."""
        self.custom.patch_namespaced_custom_object_status(
            api.GROUP, api.VERSION, namespace, api.PLURAL, name, {"status": status},
            _request_timeout=self.timeout,
        )

    def patch_progress(self, namespace: str, name: str, operations: list[Json]) -> bool:
        """Apply a JSON Patch to the status subresource. False when the API server refuses it
        because a `test` operation failed (the status is no longer what the patch was meant for)."""
        try:
            self.custom.patch_namespaced_custom_object_status(
                api.GROUP, api.VERSION, namespace, api.PLURAL, name, cast(Any, operations),
                _content_type="application/json-patch+json", _request_timeout=self.timeout,
            )
        except ApiException as exc:
            if exc.status == 422:
                return False
            raise
        return True

    # --- children -----------------------------------------------------------------------------

    def create_or_adopt(self, obj: Json, owner_uid: str) -> tuple[Json, bool]:
        """Create a child; if it already exists (restart, race), adopt it when we own it.

        Returns the object and whether this call created it. A Secret is never read back (the
        operator has no read access to Secrets): its name is unique to the owner (it carries the
        owner's UID), so one that exists is this owner's.
        """
        ns, name, kind = obj["metadata"]["namespace"], obj["metadata"]["name"], obj["kind"]
        calls: dict[str, tuple[Callable[..., Any], Callable[..., Any] | None]] = {
            "ConfigMap": (self.core.create_namespaced_config_map, self.core.read_namespaced_config_map),
            "Job": (self.batch.create_namespaced_job, self.batch.read_namespaced_job),
            "NetworkPolicy": (self.networking.create_namespaced_network_policy,
                              self.networking.read_namespaced_network_policy),
            "Secret": (self.core.create_namespaced_secret, None),
            "Service": (self.core.create_namespaced_service, self.core.read_namespaced_service),
        }
        create, read = calls[kind]
        try:
            return self._json(create, ns, obj), True
        except ApiException as exc:
            if exc.status != 409:
                raise
        if read is None:
            return obj, False
        existing = self._json(read, name, ns)
        owners = [ref.get("uid") for ref in existing["metadata"].get("ownerReferences") or []]
        if owner_uid not in owners:
            raise NotOwned(f"{kind} {name}")
        return existing, False

    def get_job(self, namespace: str, name: str) -> Json | None:
        return self._found(lambda: self._json(self.batch.read_namespaced_job, name, namespace))

    def set_job_suspend(self, namespace: str, name: str, suspend: bool) -> None:
        self.batch.patch_namespaced_job(name, namespace, {"spec": {"suspend": suspend}},
                                        _request_timeout=self.timeout)

    def get_workload(self, namespace: str, job_uid: str) -> Json | None:
        """The Kueue Workload of a Job (found by the Job-UID label Kueue gives it, and owned by the
        Job); None while Kueue has not made it, and where Kueue (kueue.x-k8s.io/v1beta2) is not installed."""
        try:
            found = cast(Json, self.custom.list_namespaced_custom_object(
                kueue.GROUP, kueue.VERSION, namespace, kueue.WORKLOADS,
                label_selector=f"{kueue.JOB_UID_LABEL}={job_uid}", _request_timeout=self.timeout))
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise
        # Kueue's Workload is owned by the Job: a decoy with the same label (anyone who may create
        # Workloads in the namespace can set it) is never taken for it.
        items: list[Json] = [w for w in found.get("items") or [] if not w["metadata"].get("deletionTimestamp")
                             and any(ref.get("uid") == job_uid for ref in w["metadata"].get("ownerReferences") or [])]
        items.sort(key=lambda w: w["metadata"].get("creationTimestamp") or "")
        return items[-1] if items else None

    def patch_workload(self, namespace: str, name: str, patch: Json) -> None:
        """Merge-patch a Kueue Workload (its spec.active and our annotation)."""
        self.custom.patch_namespaced_custom_object(
            kueue.GROUP, kueue.VERSION, namespace, kueue.WORKLOADS, name, patch,
            _content_type="application/merge-patch+json", _request_timeout=self.timeout)

    def list_pods(self, namespace: str, job: Json) -> list[Json]:
        """The pods of this very Job (by its UID: an older Job of the same name may still have pods)."""
        selector = f"batch.kubernetes.io/controller-uid={job['metadata']['uid']}"
        items: list[Json] = self._json(self.core.list_namespaced_pod, namespace, label_selector=selector)["items"]
        return items

    def delete_pods(self, namespace: str, job_uid: str, grace_seconds: int) -> None:
        """Delete the pods of this very Job (a stalled run): the Job replaces them. Each with a UID
        precondition; one already gone is no error."""
        for pod in self.list_pods(namespace, {"metadata": {"uid": job_uid}}):
            meta = pod["metadata"]
            if meta.get("deletionTimestamp"):
                continue
            try:
                # The grace period goes in the body: the API server reads DeleteOptions from the body
                # when there is one, and would take the pod's own terminationGracePeriodSeconds.
                self.core.delete_namespaced_pod(
                    meta["name"], namespace,
                    body=client.V1DeleteOptions(grace_period_seconds=grace_seconds,
                                                preconditions=client.V1Preconditions(uid=meta["uid"])),
                    _request_timeout=self.timeout)
            except ApiException as exc:
                if exc.status not in (404, 409):
                    raise

    def delete_children(self, namespace: str, name: str, uid: str) -> None:
        """Delete a FineTuneJob's Job (with its pods), ConfigMap, NetworkPolicy and Service (several
        nodes): each only if it exists and the FineTuneJob (`uid`) owns it, with a UID precondition,
        so an object of the same name that someone else made is never touched. Its report Secret
        stays until the FineTuneJob is deleted (owner reference): the operator never deletes Secrets."""
        for read, delete, child in (
            (self.batch.read_namespaced_job, self.batch.delete_namespaced_job, job_name(name)),
            (self.core.read_namespaced_config_map, self.core.delete_namespaced_config_map, config_map_name(name)),
            (self.networking.read_namespaced_network_policy, self.networking.delete_namespaced_network_policy,
             job_name(name)),
            (self.core.read_namespaced_service, self.core.delete_namespaced_service, job_name(name)),
        ):
            try:
                meta = read(child, namespace, _request_timeout=self.timeout).metadata
                if meta is None or not any(ref.uid == uid for ref in meta.owner_references or []):
                    continue
                options = client.V1DeleteOptions(propagation_policy="Background",
                                                 preconditions=client.V1Preconditions(uid=meta.uid))
                delete(child, namespace, body=options, _request_timeout=self.timeout)
            except ApiException as exc:
                if exc.status not in (404, 409):  # gone, or replaced since it was read: not ours
                    raise

    def missing_claims(self, namespace: str, claims: list[str]) -> list[str]:
        """'PersistentVolumeClaim y' for each claim that does not exist. (Missing Secrets show in
        the pod's status instead: the operator never reads Secrets.)"""
        absent = []
        for name in claims:
            try:
                self.core.read_namespaced_persistent_volume_claim(name, namespace, _request_timeout=self.timeout)
            except ApiException as exc:
                if exc.status != 404:
                    raise
                absent.append(f"PersistentVolumeClaim {name}")
        return absent

    # --- events -------------------------------------------------------------------------------

    def pod_creation_failure(self, namespace: str, job_uid: str) -> str | None:
        """The newest FailedCreate message the Job controller posted on a Job (a ResourceQuota, a
        LimitRange or Pod Security refused its pod), else None."""
        found = self.core.list_namespaced_event(
            namespace, field_selector=f"involvedObject.uid={job_uid},reason=FailedCreate",
            _request_timeout=self.timeout).items
        if not found:
            return None
        newest = max(found, key=lambda e: str(e.last_timestamp or e.event_time or e.metadata.creation_timestamp or ""))
        return str(newest.message or "")

    def event(self, owner: Json, kind: str, reason: str, message: str) -> None:
        """Post a core/v1 Event on a FineTuneJob. Best effort: a lost event never fails a reconcile."""
        meta = owner["metadata"]
        stamp = now()
        body: Json = {
            "metadata": {"generateName": f"{meta['name']}.", "namespace": meta["namespace"]},
            "involvedObject": {"apiVersion": f"{api.GROUP}/{api.VERSION}", "kind": api.KIND,
                               "name": meta["name"], "namespace": meta["namespace"], "uid": meta["uid"]},
            "type": kind,
            "reason": reason,
            "message": message[:1024],
            "source": {"component": "kubetune-operator"},
            "reportingComponent": "kubetune.io/operator",
            "reportingInstance": "kubetune-operator",
            "firstTimestamp": stamp,
            "lastTimestamp": stamp,
            "count": 1,
        }
        try:
            self.core.create_namespaced_event(meta["namespace"], cast(Any, body), _request_timeout=self.timeout)
        except ApiException as exc:
            log.warning("could not post event %s on %s/%s: %s", reason, meta["namespace"], meta["name"],
                        api_message(exc))
        except Exception as exc:  # timeouts, connection errors
            log.warning("could not post event %s on %s/%s: %s", reason, meta["namespace"], meta["name"], exc)
