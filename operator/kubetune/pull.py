"""`kubetune pull NAME [-n NS] [--to DIR]`: a finished FineTuneJob's outputs on this machine, verified.

It reads the job's status for where its outputs are, downloads every file its manifest lists into a
directory beside the target, checks each against its sha256, and only then moves the directory into
place; a file that differs is named and nothing is left behind. Then it prints the lineage and, with
``--print-serving``, ready-to-apply snippets for vLLM and KServe (docs/artifacts.md).

With ``--digest`` it pulls the job's OCI artifact (output.oci) from the registry by digest instead:
the adapter, model card, evaluation and manifest, each checked against its layer digest and the manifest.

Either way the manifest.json must be the one the job published (status.artifacts.manifestSha256).

Object-store credentials: AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY when set, else the job's
storage Secret read with the caller's own Kubernetes credentials; registry credentials:
KUBETUNE_REGISTRY_AUTH (a docker config JSON) or ~/.docker/config.json. They are never printed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from kubetune_contract.config import StorageSpec

Json = dict[str, Any]


class PullError(Exception):
    """Why nothing was pulled, for the user."""


def add_parser(sub: Any) -> None:
    pull = sub.add_parser("pull", help="download a finished FineTuneJob's outputs, verify every sha256 against its "
                                       "manifest, print the lineage")
    pull.add_argument("name", help="the FineTuneJob")
    pull.add_argument("-n", "--namespace", default=None, help="its namespace (default: the kubeconfig's)")
    pull.add_argument("--to", type=Path, help="directory to create (default: ./NAME); must not exist or be empty")
    pull.add_argument("--include", action="append", default=[], metavar="PATH",
                      help="only this file or directory of the run, e.g. adapter (repeatable); default: all")
    pull.add_argument("--endpoint", help="object-store endpoint as seen from here (default: the job's "
                                         "spec.storage.endpoint)")
    pull.add_argument("--insecure", action="store_true", default=None,
                      help="plain HTTP to the endpoint or registry (default: the job's spec.storage.insecure, "
                           "or spec.output.oci.insecure with --digest)")
    pull.add_argument("--digest", nargs="?", const="", default=None, metavar="SHA256",
                      help="pull the job's OCI artifact (output.oci) from its registry instead, by the digest in "
                           "status.artifacts.ociDigest, or by this one")
    pull.add_argument("--print-serving", action="store_true",
                      help="also print snippets to serve the result with vLLM and KServe")
    pull.add_argument("--quiet", action="store_true", help="no progress bar")


def command(args: argparse.Namespace) -> int:
    """0 pulled and verified; 1 refused (not finished, a file that differs, target not empty)."""
    from kubetune_trainer.artifacts import IncompleteRun, pull_run
    from kubetune_trainer.errors import TrainerError

    try:
        kube, namespace = connect(args.namespace)
        ftj = finished_job(kube, namespace, args.name)
        artifacts = ftj["status"]["artifacts"]
        location = str(artifacts["location"]).rstrip("/")
        storage = storage_of(ftj, args.endpoint, args.insecure)
        insecure_registry = False
        if args.digest is not None:
            location, insecure_registry = oci_location(ftj, args.digest, args.insecure)
        elif location.startswith("s3://"):
            credentials(kube, namespace, ftj)
        target = args.to or Path(args.name)
        print(f"pulling {namespace}/{args.name} from {location} to {target}", file=sys.stderr)
        with ProgressBar(args.quiet) as bar:
            # Pinned to the manifest.json the job published: a re-published or altered run is refused.
            manifest = pull_run(location, target, storage, tuple(args.include), bar,
                                manifest_sha256=artifacts.get("manifestSha256"), insecure_registry=insecure_registry)
    except (PullError, IncompleteRun, FileExistsError, TrainerError) as err:
        print(f"kubetune pull: refused: {err}; nothing was written", file=sys.stderr)
        return 1
    lineage = dict(manifest.get("lineage") or {})
    image_id = (ftj["status"]["artifacts"].get("lineage") or {}).get("imageID")
    if image_id:  # the operator's, from the pod: the trainer cannot see it
        lineage["imageID"] = image_id
    files = [e for e in manifest["files"] if (target / e["path"]).is_file()]
    digest = hashlib.sha256((target / "manifest.json").read_bytes()).hexdigest()
    print(f"verified {len(files)} files ({sum(int(e['size']) for e in files)} bytes) against "
          f"manifest.json (sha256 {digest}) in {target}")
    print("lineage:")
    print(yaml.safe_dump(lineage, sort_keys=False, width=200).rstrip() if lineage else "  (none recorded)")
    if args.print_serving:
        print(serving(args.name, namespace, target, location, ftj, digest))
    return 0


def connect(namespace: str | None) -> tuple[Any, str]:
    from kubernetes import config

    from kubetune.kube import Kube

    config.load_kube_config()  # type: ignore[no-untyped-call]
    if namespace is None:
        _, context = config.list_kube_config_contexts()  # type: ignore[no-untyped-call]
        namespace = str((context or {}).get("context", {}).get("namespace") or "default")
    return Kube(), namespace


def finished_job(kube: Any, namespace: str, name: str) -> Json:
    ftj = kube.get_finetunejob(namespace, name)
    if ftj is None:
        raise PullError(f"FineTuneJob {namespace}/{name} not found")
    status = ftj.get("status") or {}
    if status.get("phase") != "Succeeded":
        raise PullError(f"FineTuneJob {namespace}/{name} is {status.get('phase') or 'not started'}; only a "
                        "Succeeded job's outputs are complete")
    if not (status.get("artifacts") or {}).get("location"):
        raise PullError(f"FineTuneJob {namespace}/{name} has no status.artifacts.location")
    result: Json = ftj
    return result


def oci_location(ftj: Json, digest: str, insecure: bool | None) -> tuple[str, bool]:
    """(oci://registry/repository@digest, plain HTTP?) of the job's artifact: the digest in its status,
    or ``digest`` when given (checked against the job's manifest like any other)."""
    reference = str(ftj["status"]["artifacts"].get("ociReference") or "")
    if not reference:
        raise PullError("the job pushed no OCI artifact (spec.output.oci unset, or it finished before it could)")
    if digest:
        digest = digest if digest.startswith("sha256:") else f"sha256:{digest}"
        reference = f"{reference.split('@', 1)[0]}@{digest}"
    oci = ((ftj.get("spec") or {}).get("output") or {}).get("oci") or {}
    return f"oci://{reference}", bool(oci.get("insecure")) if insecure is None else insecure


def storage_of(ftj: Json, endpoint: str | None, insecure: bool | None) -> StorageSpec:
    """The job's object store, with the endpoint as reachable from here."""
    spec = {k: v for k, v in ((ftj.get("spec") or {}).get("storage") or {}).items() if k != "secretRef"}
    if endpoint:
        spec["endpoint"] = endpoint
    if insecure is not None:
        spec["insecure"] = insecure
    return StorageSpec.model_validate(spec)


def credentials(kube: Any, namespace: str, ftj: Json) -> None:
    """AWS_* from the environment, else from the job's storage Secret (the caller's own rights)."""
    if os.environ.get("AWS_ACCESS_KEY_ID") and os.environ.get("AWS_SECRET_ACCESS_KEY"):
        return
    import base64

    from kubernetes.client.exceptions import ApiException

    from kubetune.api import SecretRef

    found = ((ftj.get("spec") or {}).get("storage") or {}).get("secretRef")
    if not found:
        raise PullError("set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY: the job names no storage Secret")
    ref = SecretRef.model_validate(found)
    try:
        secret = kube.core.read_namespaced_secret(ref.name, namespace, _request_timeout=kube.timeout)
    except ApiException as err:
        raise PullError(f"cannot read the job's storage Secret {namespace}/{ref.name} ({err.status} "
                        f"{err.reason}); set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY instead") from err
    values = secret.data or {}
    for var, key in (("AWS_ACCESS_KEY_ID", ref.access_key_key), ("AWS_SECRET_ACCESS_KEY", ref.secret_key_key)):
        if key not in values:
            raise PullError(f"the storage Secret {namespace}/{ref.name} has no key {key}")
        os.environ[var] = base64.b64decode(values[key]).decode()


class ProgressBar:
    """A rich progress bar over the bytes to download (stderr), or nothing when quiet."""

    def __init__(self, quiet: bool) -> None:
        from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

        self.progress = None if quiet else Progress(
            TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
            console=_stderr_console(), transient=False,
        )

    def __enter__(self) -> Callable[[int, int], Callable[[int], None]] | None:
        if self.progress is None:
            return None
        self.progress.start()
        progress = self.progress

        def start(files: int, total: int) -> Callable[[int], None]:
            task = progress.add_task(f"{files} files", total=total)
            return lambda done: progress.advance(task, done)

        return start

    def __exit__(self, *exc: object) -> None:
        if self.progress is not None:
            self.progress.stop()


def _stderr_console() -> Any:
    from rich.console import Console

    return Console(stderr=True)


def serving(name: str, namespace: str, target: Path, location: str, ftj: Json, digest: str) -> str:
    """vLLM command lines and a KServe InferenceService for what was pulled."""
    lines = ["", "# --- serving (docs/artifacts.md) ---"]
    backbone = str(((ftj.get("spec") or {}).get("model") or {}).get("source") or "")
    model = backbone.removeprefix("hf://") if backbone.startswith("hf://") else f"<a local copy of {backbone}>"
    adapter, merged = target / "adapter", target / "merged"
    if (adapter / "adapter_config.json").is_file():
        rank = json.loads((adapter / "adapter_config.json").read_text()).get("r", 16)
        lines += ["# vLLM, the backbone with this adapter:",
                  f"vllm serve {model} --enable-lora --max-lora-rank {max(int(rank), 8)} "
                  f"--lora-modules {name}={adapter.resolve()}"]
    if (merged / "config.json").is_file():
        lines += ["# vLLM, the merged model:", f"vllm serve {merged.resolve()} --served-model-name {name}"]
    artifacts = (ftj.get("status") or {}).get("artifacts") or {}
    source = f"oci://{artifacts['ociReference']}" if artifacts.get("ociReference") else location
    lines += ["# In a pod (examples/serving-vllm.yaml): an init container of the trainer image pulls the adapter "
              "pinned by the manifest's sha256" + (" from the OCI artifact, by digest" if source != location else ""),
              f"python -m kubetune_trainer pull --location={source} --manifest-sha256=sha256:{digest} "
              f"--include=adapter --to=/adapters/{name}"]
    annotations = {"kubetune.io/finetunejob": f"{namespace}/{name}", "kubetune.io/manifest-sha256": digest}
    if artifacts.get("ociReference"):
        annotations["kubetune.io/oci-reference"] = str(artifacts["ociReference"])
    if (ftj.get("status") or {}).get("artifacts", {}).get("merged"):
        service = {
            "apiVersion": "serving.kserve.io/v1beta1",
            "kind": "InferenceService",
            "metadata": {"name": name, "namespace": namespace, "annotations": annotations},
            "spec": {"predictor": {"model": {
                "modelFormat": {"name": "huggingface"},
                "storageUri": f"{location}/merged",
                "args": [f"--model_name={name}"],
            }}},
        }
        lines += ["# KServe (Hugging Face runtime), the merged model from the store:", "---",
                  yaml.safe_dump(service, sort_keys=False).rstrip()]
    else:
        lines.append("# KServe: set output.mergeAdapter: true for a model directory its Hugging Face runtime loads")
    return "\n".join(lines)
