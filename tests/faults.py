"""Fault injection for tests: a TCP proxy that can black-hole traffic.

``BlackholeProxy`` forwards 127.0.0.1:<port> to a target. ``blackhole()`` makes the network
silently eat every byte, as a dropped route or a dead middlebox does: connections stay open,
nothing arrives, nobody gets an error. Connections that saw the black hole stay dead after
``heal()`` (half-open, as after a NAT or conntrack entry was lost); new ones work again. A client
survives only if it times out and reconnects.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from dataclasses import dataclass, field


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
