"""A small, dependency-free Kubernetes REST client for the local cluster's volume provisioner.

JSON requests (get, list, create, delete), authenticated with the client certificate or token of a
kubeconfig: the provisioner runs from the interpreter `up` runs in, which needs no client library.
"""

from __future__ import annotations

import base64
import json
import ssl
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import yaml

JSON = dict[str, Any]


class ApiError(Exception):
    """A non-2xx answer from the apiserver."""

    def __init__(self, status: int, body: str) -> None:
        self.status = status
        self.body = body
        try:
            self.reason = str(json.loads(body).get("message", body))
        except json.JSONDecodeError:
            self.reason = body
        super().__init__(f"{status}: {self.reason}")


def _material(entry: dict[str, Any], key: str, scratch: Path) -> str | None:
    """A file path for `key` of a kubeconfig entry, writing `<key>-data` to a file if needed."""
    if entry.get(f"{key}-data"):
        path = scratch / key
        path.write_bytes(base64.b64decode(entry[f"{key}-data"]))
        path.chmod(0o600)
        return str(path)
    value = entry.get(key)
    return str(value) if value else None


class Kube:
    """Talks to the apiserver named by the current context of a kubeconfig."""

    def __init__(self, kubeconfig: Path) -> None:
        config = yaml.safe_load(kubeconfig.read_text())
        context_name = config["current-context"]
        context = next(c["context"] for c in config["contexts"] if c["name"] == context_name)
        cluster = next(c["cluster"] for c in config["clusters"] if c["name"] == context["cluster"])
        user = next(u["user"] for u in config["users"] if u["name"] == context["user"])
        self.server = cluster["server"].rstrip("/")
        # ssl reads certificates only from files; it keeps them in memory once loaded.
        with tempfile.TemporaryDirectory(prefix="kube-http-") as scratch:
            ca = _material(cluster, "certificate-authority", Path(scratch))
            self._ssl = ssl.create_default_context(cafile=ca)
            cert = _material(user, "client-certificate", Path(scratch))
            key = _material(user, "client-key", Path(scratch))
            if cert:
                self._ssl.load_cert_chain(cert, key)
        self._token = user.get("token")

    def _open(self, method: str, path: str, body: Any, content_type: str, query: dict[str, Any] | None,
              timeout: float) -> Any:
        url = self.server + path
        if query:
            url += "?" + urllib.parse.urlencode({k: v for k, v in query.items() if v is not None})
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(url, data=data, method=method)
        request.add_header("Accept", "application/json")
        if data is not None:
            request.add_header("Content-Type", content_type)
        if self._token:
            request.add_header("Authorization", f"Bearer {self._token}")
        try:
            return urllib.request.urlopen(request, timeout=timeout, context=self._ssl)
        except urllib.error.HTTPError as error:
            raise ApiError(error.code, error.read().decode(errors="replace")) from None

    def request(self, method: str, path: str, body: Any = None, *, content_type: str = "application/json",
                query: dict[str, Any] | None = None, timeout: float = 30) -> JSON:
        with self._open(method, path, body, content_type, query, timeout) as response:
            raw = response.read()
        result: JSON = json.loads(raw) if raw else {}
        return result

    def get(self, path: str, **query: Any) -> JSON:
        return self.request("GET", path, query=query or None)

    def create(self, path: str, body: JSON) -> JSON:
        return self.request("POST", path, body)

    def delete(self, path: str, body: JSON | None = None) -> JSON:
        return self.request("DELETE", path, body)
