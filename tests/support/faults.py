"""Fault injection for tests: a TCP proxy that can black-hole traffic, and a hostile config.json server.

``BlackholeProxy`` forwards 127.0.0.1:<port> to a target. ``blackhole()`` makes the network
silently eat every byte, as a dropped route or a dead middlebox does: connections stay open,
nothing arrives, nobody gets an error. Connections that saw the black hole stay dead after
``heal()`` (half-open, as after a NAT or conntrack entry was lost); new ones work again. A client
survives only if it times out and reconnects.
"""

from __future__ import annotations

import contextlib
import http.server
import json
import socket
import threading
from dataclasses import dataclass, field
from typing import Any

CONFIG_MAX_BYTES = 1024 * 1024  # kubetune.preflight.CONFIG_MAX_BYTES: `big` and `endless` send more


@dataclass(eq=False)
class _Link:
    client: socket.socket
    upstream: socket.socket | None = None
    dead: bool = False
    closed: threading.Event = field(default_factory=threading.Event)

    def close(self) -> None:
        self.closed.set()
        for sock in (self.client, self.upstream):
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.close()


class BlackholeProxy:
    """A loopback TCP proxy with a black-hole switch. Use as a context manager."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._holed = threading.Event()
        self._links: set[_Link] = set()
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self.connections = 0

    def __enter__(self) -> BlackholeProxy:
        threading.Thread(target=self._accept, daemon=True, name="proxy-accept").start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def blackhole(self) -> None:
        """From now on, every byte in either direction vanishes; open connections die for good."""
        with self._lock:
            self._holed.set()
            for link in self._links:
                link.dead = True

    def heal(self) -> None:
        """New connections work again (those that saw the black hole stay dead)."""
        self._holed.clear()

    def close(self) -> None:
        self._stopped.set()
        self._listener.close()
        with self._lock:
            for link in list(self._links):
                link.close()

    def _accept(self) -> None:
        while not self._stopped.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            self.connections += 1
            link = _Link(client)
            with self._lock:
                link.dead = self._holed.is_set()
                self._links.add(link)
            if not link.dead:
                try:
                    link.upstream = socket.create_connection(self.target, timeout=5)
                    link.upstream.settimeout(None)
                except OSError:
                    self._drop(link)
                    continue
            threading.Thread(target=self._pump, args=(link, client, True), daemon=True).start()
            if link.upstream is not None:
                threading.Thread(target=self._pump, args=(link, link.upstream, False), daemon=True).start()

    def _pump(self, link: _Link, source: socket.socket, from_client: bool) -> None:
        try:
            while True:
                data = source.recv(65536)
                if not data:
                    break
                if link.dead or self._holed.is_set():
                    link.dead = True
                    continue  # swallowed: the peer waits for an answer that never comes
                destination = link.upstream if from_client else link.client
                if destination is None:
                    continue
                destination.sendall(data)
        except OSError:
            pass
        self._drop(link)

    def _drop(self, link: _Link) -> None:
        with self._lock:
            self._links.discard(link)
        link.close()


class HostileConfigServer:
    """A real HTTP server on loopback serving a backbone's config.json as a job author who wants to
    stall the operator would: /<bucket>/<name>/config.json misbehaves according to <name>. `drip`
    sends a body one byte every `drip_every` seconds until `close()`, `drip-headers` the same with
    header lines; `redirect`, `nested`, `huge-int`, `huge-dims`, `big`, `endless` as named; any
    other name gets a tiny valid config.json."""

    def __init__(self, drip_every: float = 0.5) -> None:
        hostile = self
        self.requests: list[str] = []
        self.stop = threading.Event()

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def send(self, body: bytes, status: int = 200, **headers: str) -> None:
                self.send_response(status)
                for key, value in headers.items():
                    self.send_header(key.replace("_", "-"), value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def drip(self, piece: bytes) -> None:
                """Send `piece` every `drip_every` seconds until the server closes or the client goes."""
                while not hostile.stop.wait(drip_every):
                    try:
                        self.wfile.write(piece)
                        self.wfile.flush()
                    except OSError:
                        return

            def do_GET(self) -> None:
                hostile.requests.append(self.path)
                name = self.path.split("/")[2]  # /<bucket>/<name>/config.json
                if name == "drip":
                    self.send_response(200)
                    self.send_header("Content-Length", "1000000")
                    self.end_headers()
                    self.drip(b" ")
                elif name == "drip-headers":
                    self.wfile.write(b"HTTP/1.1 200 OK\r\n")
                    self.drip(b"X: y\r\n")
                elif name == "redirect":
                    self.send(b"", 302, Location=f"http://127.0.0.1:{self.server.server_address[1]}/m/tiny/config.json")
                elif name == "nested":
                    self.send(b"[" * 200_000 + b"]" * 200_000)
                elif name == "huge-int":
                    # 5001 digits: past Python's limit on converting a decimal string to an int
                    self.send(b'{"hidden_size": 1' + b"0" * 5000 + b', "num_attention_heads": 4}')
                elif name == "huge-dims":
                    self.send(json.dumps({"hidden_size": 10**300, "num_attention_heads": 4,
                                          "num_hidden_layers": 2, "vocab_size": 10}).encode())
                elif name == "big":
                    self.send(b" " * (CONFIG_MAX_BYTES + 10))
                elif name == "endless":
                    self.send_response(200)
                    self.end_headers()  # no Content-Length: read until the cap
                    try:
                        while not hostile.stop.is_set():
                            self.wfile.write(b" " * 65536)
                    except OSError:
                        return
                else:
                    self.send(json.dumps({"model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
                                          "num_hidden_layers": 2, "num_attention_heads": 4,
                                          "vocab_size": 54}).encode())

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.endpoint = f"127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.stop.set()
        self.server.shutdown()
        self.server.server_close()


def pod_processes(pod_uid: str) -> list[int]:
    """PIDs on this machine of a pod's containers (the real node's cgroups name the pod's UID, with
    dashes under cgroupfs and underscores under systemd), its pause process left out."""
    import os
    from pathlib import Path

    marks = (pod_uid, pod_uid.replace("-", "_"))
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cgroup = (entry / "cgroup").read_text()
            command = (entry / "cmdline").read_bytes().split(b"\0")[0]
        except OSError:  # gone meanwhile
            continue
        if any(f"pod{mark}" in cgroup for mark in marks) and not command.endswith(b"pause"):
            found.append(int(entry.name))
    return [pid for pid in found if pid != os.getpid()]


def freeze(pids: list[int], thaw: bool = False) -> None:
    """SIGSTOP: the processes stay, hold their memory and sockets, and do nothing (a hung collective);
    `thaw`: SIGCONT, they go on."""
    import os
    import signal

    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT if thaw else signal.SIGSTOP)
