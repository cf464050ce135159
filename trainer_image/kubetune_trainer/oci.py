"""output.oci: a published run's adapter as one OCI artifact, pushed by tag and read back by digest.

The artifact (docs/artifacts.md#oci-artifacts) is an OCI image manifest with ``artifactType``
:data:`ARTIFACT_TYPE`, the empty config, and one layer per file — the adapter directory (``model/``
for a full fine-tune), ``README.md`` (the model card), ``evaluation.json`` and ``manifest.json`` —
each titled with its path in the run (``org.opencontainers.image.title``). The run's
``manifest.json`` inside it lists every file's sha256, so a pull checks the files twice: against
the layer digests and against the manifest.

The registry client is oras; requests time out and are tried once each, and whole operations are
retried by :func:`sources.retrying` for the store's retry window, like the object store.
Credentials are a docker config JSON (``auths``) — the job's kubernetes.io/dockerconfigjson Secret
in ``KUBETUNE_REGISTRY_AUTH``, or ``~/.docker/config.json`` when pulling on a workstation.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from kubetune_contract.config import REGISTRY_AUTH_ENV, OciSpec

from .errors import InvalidInput, RegistryUnavailable, SourceUnavailable, TrainerError
from .sources import retrying, sha256_of, store_retry_seconds

log = logging.getLogger(__name__)

T = TypeVar("T")

ARTIFACT_TYPE = "application/vnd.kubetune.adapter.v1"
"""The artifact's artifactType."""
MANIFEST_MEDIA_TYPE = "application/vnd.oci.image.manifest.v1+json"
EMPTY_CONFIG = {"mediaType": "application/vnd.oci.empty.v1+json",
                "digest": "sha256:" + hashlib.sha256(b"{}").hexdigest(), "size": 2}
MEDIA_TYPES = {
    "manifest.json": "application/vnd.kubetune.manifest.v1+json",
    "README.md": "text/markdown",
    "evaluation.json": "application/vnd.kubetune.evaluation.v1+json",
}
FILE_MEDIA_TYPE = "application/vnd.kubetune.file.v1"
"""Every other file: adapter weights, adapter config, tokenizer files."""
TITLE = "org.opencontainers.image.title"
RUN_ANNOTATION = "io.kubetune.run"
"""The run directory the artifact was published from: a retry of the same run may replace its own tag."""
CHUNKED_ABOVE = 64 * 1024 * 1024
"""Files larger than this are uploaded in chunks (PATCH), not held in memory for one PUT."""
TIMEOUT_S = (10.0, 120.0)
"""(connect, read) timeout of every request."""


class RegistryError(Exception):
    """The registry answered with an unexpected HTTP status."""

    def __init__(self, what: str, status: int, body: str) -> None:
        super().__init__(f"{what}: HTTP {status} {body[:300]}")
        self.status = status


def is_transient(err: BaseException) -> bool:
    """No connection, a timeout, a broken transfer, 429 or 5xx: the registry may answer again."""
    import requests

    if isinstance(err, RegistryError):
        return err.status == 429 or err.status >= 500
    return isinstance(err, requests.exceptions.ConnectionError | requests.exceptions.Timeout
                      | requests.exceptions.ChunkedEncodingError)


def files_to_push(manifest: dict[str, Any]) -> list[str]:
    """The files of a published run that make its artifact: the adapter (or the fully trained
    model), the model card, the evaluation, and manifest.json last."""
    paths = [str(e["path"]) for e in manifest["files"]]
    chosen = [p for p in paths if p.startswith(("adapter/", "model/")) or p in ("README.md", "evaluation.json")]
    return [*sorted(chosen), "manifest.json"]


def media_type(path: str) -> str:
    return MEDIA_TYPES.get(path, FILE_MEDIA_TYPE)


@dataclass(frozen=True)
class Reference:
    """registry[:port]/repository, with a tag or a digest."""

    registry: str
    repository: str
    tag: str | None = None
    digest: str | None = None

    @classmethod
    def parse(cls, text: str) -> Reference:
        name, digest = text.split("@", 1) if "@" in text else (text, None)
        registry, _, repository = name.partition("/")
        tag = None
        if ":" in repository:
            repository, tag = repository.rsplit(":", 1)
        if not registry or not repository:
            raise InvalidInput(f"{text!r} is not registry/repository[:tag][@sha256:digest]")
        return cls(registry, repository, tag, digest)

    @property
    def name(self) -> str:
        return f"{self.registry}/{self.repository}"

    def __str__(self) -> str:
        return self.name + (f":{self.tag}" if self.tag else "") + (f"@{self.digest}" if self.digest else "")


def registry_auth() -> str | None:
    """The docker config JSON: ``KUBETUNE_REGISTRY_AUTH``, else ``$DOCKER_CONFIG/config.json`` or
    ``~/.docker/config.json`` when there is one."""
    if os.environ.get(REGISTRY_AUTH_ENV):
        return os.environ[REGISTRY_AUTH_ENV]
    path = Path(os.environ.get("DOCKER_CONFIG") or Path.home() / ".docker") / "config.json"
    return path.read_text() if path.is_file() else None


DOCKER_HUB = ("docker.io", "index.docker.io", "registry-1.docker.io")


def credentials(auth_json: str | None, registry: str) -> tuple[str, str] | None:
    """(username, password) for ``registry`` from a docker config JSON's ``auths``; None when it has
    none. Errors never quote the JSON (it holds the password)."""
    if not auth_json:
        return None
    where = f"the registry credentials ({REGISTRY_AUTH_ENV}, the .dockerconfigjson of output.oci.secretRef)"
    try:
        config = json.loads(auth_json)
    except ValueError:
        raise InvalidInput(f"{where} are not JSON") from None
    auths = config.get("auths") if isinstance(config, dict) else None
    if not isinstance(auths, dict):
        raise InvalidInput(f"{where} have no \"auths\" object")

    def host(key: str) -> str:
        bare = key.split("://", 1)[-1].split("/", 1)[0]
        return "docker.io" if bare in DOCKER_HUB else bare

    wanted = host(registry)
    for key, entry in auths.items():
        if host(str(key)) != wanted or not isinstance(entry, dict):
            continue
        if entry.get("auth"):
            try:
                user, _, password = base64.b64decode(str(entry["auth"]), validate=True).decode().partition(":")
            except (binascii.Error, UnicodeDecodeError):
                raise InvalidInput(f"{where}: the \"auth\" of {key} is not base64 of user:password") from None
            return user, password
        if entry.get("username") is not None:
            return str(entry["username"]), str(entry.get("password") or "")
    return None


class Registry:
    """One repository of an OCI registry (oras), every operation retried for the store's window.

    ``unavailable`` errors are SourceUnavailable (exit 4: counted, a wrong registry fails the job)
    until the registry has answered once in this process, then RegistryUnavailable (exit 7: an
    outage of a registry known to work; the Job does not count it).
    """

    def __init__(self, repository: str, insecure: bool, auth_json: str | None,
                 retry_seconds: float | None = None) -> None:
        self.ref = Reference.parse(repository)
        self.insecure = insecure
        self.scheme = "http" if insecure else "https"
        self.retry_seconds = store_retry_seconds() if retry_seconds is None else retry_seconds
        self.answered = False
        self._login = credentials(auth_json, self.ref.registry)
        self._client: Any = None

    # -- plumbing ------------------------------------------------------------------------------

    def _unavailable(self, message: str) -> TrainerError:
        if self.answered:
            return RegistryUnavailable(message)
        return SourceUnavailable(f"output.oci.repository: {message}")

    def _retrying(self, what: str, operation: Callable[[], T]) -> T:
        return retrying(what, operation, self.retry_seconds, self._unavailable, is_transient, "registry")

    def client(self) -> Any:
        """The oras client, its auth backend chosen by the registry's challenge (Basic or Bearer)."""
        if self._client is None:
            self._client = self._retrying(f"reach {self.ref.registry}", self._connect)
            self.answered = True
        return self._client

    def _connect(self) -> Any:
        import oras.provider
        import requests

        class Timeouts(requests.adapters.HTTPAdapter):
            def send(self, request: Any, *args: Any, **kwargs: Any) -> Any:
                if kwargs.get("timeout") is None:
                    kwargs["timeout"] = TIMEOUT_S
                return super().send(request, *args, **kwargs)

        class Client(oras.provider.Registry):  # type: ignore[misc]
            def do_request(self, *args: Any, **kwargs: Any) -> Any:
                # One try per request: Registry._retrying owns the waiting (oras's own retry decorator
                # sleeps for minutes without a deadline).
                return oras.provider.Registry.do_request.__wrapped__(self, *args, **kwargs)

        probe = requests.get(f"{self.scheme}://{self.ref.registry}/v2/", timeout=TIMEOUT_S)
        if probe.status_code >= 500:
            raise RegistryError(f"{self.ref.registry}/v2/", probe.status_code, probe.text)
        challenge = probe.headers.get("Www-Authenticate", "")
        client = Client(hostname=self.ref.registry, insecure=self.insecure,
                        auth_backend="basic" if challenge.lower().startswith("basic") else "token")
        for scheme in ("http://", "https://"):
            client.session.mount(scheme, Timeouts())
        if self._login:
            client.auth.set_basic_auth(*self._login)
        elif challenge.lower().startswith("basic"):
            raise InvalidInput(f"output.oci.secretRef: {self.ref.registry} asks for a password and no "
                               "credentials for it were given")
        return client

    def _request(self, what: str, method: str, url: str, **kwargs: Any) -> Any:
        response = self.client().do_request(url, method, **kwargs)
        if response.status_code in (401, 403):
            raise InvalidInput(f"output.oci.secretRef: {self.ref.registry} refused the credentials for {what} "
                               f"(HTTP {response.status_code})")
        if response.status_code >= 500 or response.status_code == 429:
            raise RegistryError(what, response.status_code, response.text)
        return response

    def _url(self, kind: str, reference: str) -> str:
        return f"{self.scheme}://{self.ref.registry}/v2/{self.ref.repository}/{kind}/{reference}"

    # -- reading -------------------------------------------------------------------------------

    def manifest(self, reference: str) -> tuple[str, bytes] | None:
        """(digest, bytes) of the manifest a tag or digest names; None when there is none. A digest's
        manifest is checked against it."""
        what = f"{self.ref.name}:{reference}" if ":" not in reference else f"{self.ref.name}@{reference}"

        def get() -> tuple[str, bytes] | None:
            response = self._request(what, "GET", self._url("manifests", reference),
                                     headers={"Accept": MANIFEST_MEDIA_TYPE})
            if response.status_code == 404:
                return None
            if response.status_code != 200:
                raise RegistryError(what, response.status_code, response.text)
            body: bytes = response.content
            return "sha256:" + hashlib.sha256(body).hexdigest(), body

        found = self._retrying(f"read {what}", get)
        if found is not None and reference.startswith("sha256:") and found[0] != reference:
            raise TrainerError(f"{what}: the registry served a manifest whose digest is {found[0]}")
        return found

    def download(self, digest: str, local: Path, tell: Callable[[int], None] | None = None) -> str:
        """Write a blob to ``local``; return the sha256 of what arrived (the caller compares)."""

        def get() -> str:
            digester = hashlib.sha256()
            with self._request(f"{self.ref.name}@{digest}", "GET", self._url("blobs", digest), stream=True) as r:
                if r.status_code != 200:
                    raise RegistryError(f"blob {digest}", r.status_code, r.text)
                with local.open("wb") as out:
                    for chunk in r.iter_content(chunk_size=1 << 20):
                        digester.update(chunk)
                        out.write(chunk)
                        if tell:
                            tell(len(chunk))
            return "sha256:" + digester.hexdigest()

        local.parent.mkdir(parents=True, exist_ok=True)
        return self._retrying(f"download {self.ref.name}@{digest}", get)

    # -- pushing -------------------------------------------------------------------------------

    def check_tag(self, tag: str, run: str, overwrite: bool) -> None:
        """Before training: the registry answers and ``tag`` names nothing, or this run's own
        artifact (a retry), or ``overwrite`` is set; else InvalidInput naming output.oci.tag."""
        found = self.manifest(tag)
        if found is None or overwrite:
            return
        digest, body = found
        try:
            owner = (json.loads(body).get("annotations") or {}).get(RUN_ANNOTATION)
        except (ValueError, AttributeError):
            owner = None
        if owner != run:
            raise InvalidInput(f"output.oci.tag: {self.ref.name}:{tag} already names {digest}; set "
                               "output.oci.overwrite: true to replace it, or choose another tag (nothing was pushed)")

    def upload(self, path: Path, layer: dict[str, Any]) -> None:
        def put() -> None:
            client = self.client()
            response = client.upload_blob(str(path), client.get_container(self.ref.name), layer,
                                          do_chunked=int(layer["size"]) > CHUNKED_ABOVE)
            if response.status_code in (401, 403):
                raise InvalidInput(f"output.oci.secretRef: {self.ref.registry} refused to store {path.name} "
                                   f"(HTTP {response.status_code})")
            if response.status_code not in (200, 201, 202):
                raise RegistryError(f"upload {layer['digest']}", response.status_code, response.text)

        self._retrying(f"push {layer.get('annotations', {}).get(TITLE, layer['digest'])} to {self.ref.name}", put)

    def put_manifest(self, tag: str, body: bytes) -> str:
        digest = "sha256:" + hashlib.sha256(body).hexdigest()

        def put() -> None:
            response = self._request(f"{self.ref.name}:{tag}", "PUT", self._url("manifests", tag), data=body,
                                     headers={"Content-Type": MANIFEST_MEDIA_TYPE})
            if response.status_code not in (200, 201):
                raise RegistryError(f"push the manifest of {self.ref.name}:{tag}", response.status_code, response.text)
            told = response.headers.get("Docker-Content-Digest")
            if told and told != digest:
                raise TrainerError(f"{self.ref.name}:{tag}: the registry stored the manifest as {told}, not {digest}")

        self._retrying(f"push the manifest of {self.ref.name}:{tag}", put)
        return digest


def push(registry: Registry, spec: OciSpec, staging: Path, manifest: dict[str, Any], run: str,
         created: str | None) -> Reference:
    """Push the run's artifact (:func:`files_to_push` from ``staging``) under ``spec.tag``; return it
    by digest. The tag is checked again first: it may have been taken while the run trained."""
    tag = spec.tag or "latest"
    registry.check_tag(tag, run, spec.overwrite)
    layers = []
    for path in files_to_push(manifest):
        local = staging / path
        layer = {"mediaType": media_type(path), "digest": "sha256:" + sha256_of(local),
                 "size": local.stat().st_size, "annotations": {TITLE: path}}
        registry.upload(local, layer)
        layers.append(layer)
    with tempfile.TemporaryDirectory(prefix="kubetune-oci-") as tmp:
        config = Path(tmp) / "config.json"
        config.write_bytes(b"{}")
        registry.upload(config, dict(EMPTY_CONFIG))
    annotations = {RUN_ANNOTATION: run, "io.kubetune.manifest.sha256": sha256_of(staging / "manifest.json")}
    if created:
        annotations["org.opencontainers.image.created"] = created
    document = {"schemaVersion": 2, "mediaType": MANIFEST_MEDIA_TYPE, "artifactType": ARTIFACT_TYPE,
                "config": EMPTY_CONFIG, "layers": layers, "annotations": annotations}
    body = json.dumps(document, indent=2, sort_keys=True).encode()
    digest = registry.put_manifest(tag, body)
    pushed = Reference(registry.ref.registry, registry.ref.repository, digest=digest)
    log.info("pushed %d files to %s:%s as %s", len(layers), registry.ref.name, tag, digest)
    return pushed


class OciStore:
    """A pushed artifact, pinned by digest, read as an artifacts.Store (read-only): ``list`` gives
    its files, ``get_file`` checks each blob against its layer digest."""

    def __init__(self, reference: str, insecure: bool = False, auth_json: str | None = None) -> None:
        from .artifacts import IncompleteRun, check_key

        ref = Reference.parse(reference)
        if not (ref.digest or "").startswith("sha256:"):
            raise InvalidInput(f"{reference}: name the artifact by digest (…@sha256:…), not by tag")
        self.uri = f"oci://{ref}"
        self.registry = Registry(ref.name, insecure, auth_json)
        found = self.registry.manifest(str(ref.digest))
        if found is None:
            raise IncompleteRun(f"{ref}: no such artifact")
        document = json.loads(found[1])
        if document.get("artifactType") != ARTIFACT_TYPE:
            raise IncompleteRun(f"{ref}: not a KubeTune artifact (artifactType {document.get('artifactType')!r})")
        self.layers: dict[str, dict[str, Any]] = {}
        for layer in document.get("layers") or []:
            title = (layer.get("annotations") or {}).get(TITLE)
            try:
                self.layers[check_key(title)] = layer
            except ValueError as err:
                raise IncompleteRun(f"{ref}: layer {layer.get('digest')} rejected: {err}") from err

    def list(self, prefix: str = "") -> list[str]:
        return sorted(k for k in self.layers if k.startswith(prefix))

    def size(self, key: str) -> int | None:
        layer = self.layers.get(key)
        return int(layer["size"]) if layer else None

    def get_file(self, key: str, local: Path, progress: Callable[[int], None] | None = None) -> None:
        from .artifacts import IncompleteRun

        layer = self.layers.get(key)
        if layer is None:
            raise FileNotFoundError(f"{self.uri}: no layer titled {key}")
        found = self.registry.download(str(layer["digest"]), local, progress)
        if found != layer["digest"]:
            local.unlink(missing_ok=True)
            raise IncompleteRun(f"{self.uri}: {key} arrived with sha256 {found.removeprefix('sha256:')}, "
                                f"its layer says {layer['digest']}: the blob was altered")

    def put_file(self, local: Path, key: str) -> None:
        raise PermissionError(f"{self.uri} is read-only")

    def delete(self, key: str) -> None:
        raise PermissionError(f"{self.uri} is read-only")
