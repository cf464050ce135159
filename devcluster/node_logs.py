"""`kubectl logs` for the local node agent (development and tests only): the kubelet's
/containerLogs endpoint, which the apiserver proxies to."""

from __future__ import annotations

import contextlib
import logging
import ssl
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING, Any

from devcluster.pod_worker import POLL_S

if TYPE_CHECKING:
    from node_agent import Agent

log = logging.getLogger("node-agent")




class LogServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, agent: Agent, cert: Path, key: Path) -> None:
        super().__init__(("127.0.0.1", 0), LogHandler)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(str(cert), str(key))
        self.socket = context.wrap_socket(self.socket, server_side=True)
        self.agent = agent


class LogHandler(BaseHTTPRequestHandler):
    """Serves container log files; no authentication (loopback only, development only)."""

    server: LogServer

    def log_message(self, format: str, *args: Any) -> None:
        log.debug(format, *args)

    def do_GET(self) -> None:
        url = urllib.parse.urlsplit(self.path)
        parts = url.path.strip("/").split("/")
        if parts == ["healthz"]:
            self.reply(200, b"ok")
            return
        if len(parts) != 4 or parts[0] != "containerLogs":
            self.reply(404, b"not found")
            return
        namespace, pod, container = parts[1:]
        path = self.server.agent.pod_log_dir / f"{namespace}_{pod}_{container}.log"
        if not path.exists():
            self.reply(404, f"no logs for container {container} of pod {namespace}/{pod}".encode())
            return
        query = urllib.parse.parse_qs(url.query)
        data = path.read_bytes()
        if "tailLines" in query:
            lines = data.splitlines(keepends=True)
            data = b"".join(lines[-int(query["tailLines"][0]):]) if int(query["tailLines"][0]) else b""
        if "limitBytes" in query:
            data = data[: int(query["limitBytes"][0])]
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.end_headers()
        self.wfile.write(data)
        if query.get("follow", ["false"])[0] == "true":
            self.follow(path, path.stat().st_size, namespace, pod, container)

    def follow(self, path: Path, offset: int, namespace: str, pod: str, container: str) -> None:
        with contextlib.suppress(OSError), path.open("rb") as handle:
            handle.seek(offset)
            while True:
                chunk = handle.read(65536)
                if chunk:
                    self.wfile.write(chunk)
                    self.wfile.flush()
                elif not self.server.agent.container_running(namespace, pod, container):
                    self.wfile.write(handle.read())
                    return
                else:
                    time.sleep(POLL_S)

    def reply(self, code: int, body: bytes) -> None:
        self.send_response(code)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
