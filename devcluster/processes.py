"""A cluster's directory (`Paths`), its state file (`State`: processes, ports, endpoints) and the
detached processes ``up`` starts: each in its own process group, carrying a marker variable so
``down`` finds stragglers; free ports; waiting on a condition."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from devcluster import NODE_NAME

# Every process `up` starts carries this variable set to the cluster directory, so `down` finds
# stragglers even when the state file is incomplete.
MARKER_ENV = "KUBETUNE_LOCAL_CLUSTER"


@dataclass(frozen=True)
class Paths:
    """Fixed places of one cluster instance below its directory."""

    root: Path

    @property
    def pki(self) -> Path:
        return self.root / "pki"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def bin(self) -> Path:
        return self.root / "bin"

    @property
    def state(self) -> Path:
        return self.root / "cluster.json"

    @property
    def kubeconfig(self) -> Path:
        return self.root / "kubeconfig"

    @property
    def minio_env(self) -> Path:
        return self.root / "minio.env"

    @property
    def data(self) -> Path:
        """Everything that belongs to one running cluster and goes away with `down`."""
        return self.root / "data"

    @property
    def pvs(self) -> Path:
        return self.root / "pvs"


def free_ports(count: int) -> list[int]:
    """Distinct free loopback ports (held open together so none is handed out twice)."""
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


@dataclass
class ProcessRecord:
    name: str
    pid: int
    start_ticks: int  # /proc/<pid>/stat field 22: tells a reused pid from ours
    args: list[str]
    env: dict[str, str] = field(default_factory=dict)  # extra environment, to restart it alike

    def alive(self) -> bool:
        return process_start_ticks(self.pid) == self.start_ticks


@dataclass
class State:
    dir: str
    processes: list[ProcessRecord] = field(default_factory=list)
    ports: dict[str, int] = field(default_factory=dict)
    ready: bool = False
    apiserver: str = ""
    kubeconfig: str = ""
    kubectl: str = ""
    helm: str = ""
    node: str = NODE_NAME
    minio_endpoint: str = ""
    kubectl_cache: str = ""  # KUBECACHEDIR for this cluster: no stale discovery from an earlier one
    gpus: int = 0  # nvidia.com/gpu capacity of the node
    registry: str = ""  # host:port of the loopback image registry (plain HTTP)
    node_ip: str = ""  # the node's address: pods reach the apiserver and MinIO there

    def save(self, path: Path) -> None:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=2) + "\n")
        tmp.chmod(0o600)  # holds MinIO's credentials
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path) -> State | None:
        try:
            raw = json.loads(path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None
        raw["processes"] = [ProcessRecord(**p) for p in raw.get("processes", [])]
        return cls(**raw)


def process_start_ticks(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    if fields[0] == "Z":  # a zombie is gone for our purposes
        return None
    return int(fields[19])


def start_process(
    name: str, args: list[str], paths: Paths, state: State, env: dict[str, str] | None = None,
    append_log: bool = False,
) -> ProcessRecord:
    """Start a detached process (own session and process group) logging to logs/<name>.log."""
    full_env = {**os.environ, **(env or {}), MARKER_ENV: str(paths.root)}
    with (paths.logs / f"{name}.log").open("ab" if append_log else "wb") as logfile:
        proc = subprocess.Popen(
            args, stdin=subprocess.DEVNULL, stdout=logfile, stderr=subprocess.STDOUT,
            start_new_session=True, env=full_env, cwd=paths.root,
        )
    record = ProcessRecord(name=name, pid=proc.pid, start_ticks=process_start_ticks(proc.pid) or 0, args=args,
                           env=env or {})
    state.processes.append(record)
    state.save(paths.state)
    return record


def marked_processes(root: Path) -> list[int]:
    """Pids of live processes whose environment carries this cluster's marker."""
    marker = f"{MARKER_ENV}={root}".encode()
    pids = []
    for proc_dir in Path("/proc").iterdir():
        if not proc_dir.name.isdigit() or int(proc_dir.name) == os.getpid():
            continue
        try:
            environ = (proc_dir / "environ").read_bytes()
        except OSError:
            continue
        if marker in environ.split(b"\0") and process_start_ticks(int(proc_dir.name)) is not None:
            pids.append(int(proc_dir.name))
    return pids


def signal_group(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, sig)


def poll_until(predicate: Callable[[], bool], timeout: float, what: str, interval: float = 0.1) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def exited(record: ProcessRecord) -> bool:
    return not record.alive()


@contextlib.contextmanager
def exclusive(lock_path: Path) -> Iterator[None]:
    """Serialize up/down of one cluster directory (parallel test sessions may race)."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with lock_path.open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def http_ok(url: str, context: ssl.SSLContext | None = None) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2, context=context) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError):
        return False
