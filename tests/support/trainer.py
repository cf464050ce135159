"""Helpers for the trainer tests: the tiny assets module, small configs and a private MinIO server."""

from __future__ import annotations

import os
import secrets
import socket
import subprocess
from pathlib import Path
from typing import Any

from devcluster import binaries, processes
from kubetune_contract.config import TrainerConfig
from tests.support.helpers import wait_for

REPO = Path(__file__).resolve().parents[2]



def minio_binary() -> Path:
    """The MinIO server the local cluster runs (hack/build-binaries.sh builds it once, if missing)."""
    return Path(binaries.find_binaries().minio)


def tiny_config(assets: Path, location: Path | str, **sections: dict[str, Any]) -> dict[str, Any]:
    """A small, fast config for the tiny backbone; ``sections`` update the defaults per section."""
    config: dict[str, Any] = {
        "runName": "tiny",
        "model": {"source": str(assets / "backbone")},
        "dataset": {
            "train": str(assets / "data" / "train.jsonl"),
            "validation": str(assets / "data" / "validation.jsonl"),
            "maxLength": 32,
        },
        "training": {
            "maxSteps": 30,
            "batchSize": 8,
            "learningRate": 0.01,
            "warmupRatio": 0.0,
            "evalEverySteps": 10,
            "checkpointEverySteps": 10,
            "gradientCheckpointing": False,
            "seed": 7,
        },
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
        "output": {"location": str(location)},
        # The tiny task's answers are at most 3 words: 8 new tokens keep evaluation short in every test.
        "evaluation": {"maxNewTokens": 8},
    }
    for name, values in sections.items():
        if isinstance(config.get(name), dict):
            config[name].update(values)
        else:
            config[name] = values
    return config


def make_config(assets: Path, location: Path | str, **sections: Any) -> TrainerConfig:
    return TrainerConfig.model_validate(tiny_config(assets, location, **sections))


class Server:
    """A server process of the tests' own, on a fixed port across stop() and start()."""

    port: int
    process: subprocess.Popen[bytes] | None = None

    def stop(self) -> None:
        """Stop the server and wait until its port refuses connections."""
        if self.process is None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=30)
        self.process = None
        wait_for(lambda: not port_open(self.port), timeout=30, message=f"port {self.port} closed")


def registry_binary() -> Path:
    """The CNCF distribution registry the local cluster runs (hack/build-binaries.sh)."""
    return Path(binaries.find_binaries().registry)


class RegistryServer(Server):
    """A distribution registry of its own (plain HTTP on loopback, blobs under ``root``), with a
    password (htpasswd, bcrypt) when ``user`` is given."""

    def __init__(self, binary: Path, root: Path, user: str | None = None, password: str | None = None) -> None:
        import json

        self.binary, self.root, self.log = binary, root, root / "registry.log"
        root.mkdir(parents=True, exist_ok=True)
        (self.port,) = processes.free_ports(1)
        self.endpoint = f"127.0.0.1:{self.port}"
        config: dict[str, Any] = {
            "version": 0.1,
            "log": {"level": "warn", "accesslog": {"disabled": True}},
            "storage": {"filesystem": {"rootdirectory": str(root / "data")}, "delete": {"enabled": True}},
            "http": {"addr": self.endpoint},
        }
        if user is not None:
            import bcrypt

            hashed = bcrypt.hashpw((password or "").encode(), bcrypt.gensalt(rounds=5)).decode()
            (root / "htpasswd").write_text(f"{user}:{hashed}\n")
            config["auth"] = {"htpasswd": {"realm": "test", "path": str(root / "htpasswd")}}
        self.config = root / "registry.yaml"
        self.config.write_text(json.dumps(config))  # JSON is YAML

    def start(self) -> None:
        with self.log.open("ab") as log:
            self.process = subprocess.Popen([str(self.binary), "serve", str(self.config)],
                                            env={"PATH": os.environ.get("PATH", ""), "OTEL_TRACES_EXPORTER": "none"},
                                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        wait_for(self.ready, timeout=60, message=f"registry on {self.endpoint} (log: {self.log})")

    def ready(self) -> bool:
        import urllib.error
        import urllib.request

        assert self.process is not None
        if self.process.poll() is not None:
            raise AssertionError(f"the registry exited with {self.process.returncode}: {self.log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"http://{self.endpoint}/v2/", timeout=2) as response:
                return bool(response.status == 200)
        except urllib.error.HTTPError as err:
            return err.code == 401  # up, and asking for the password
        except OSError:
            return False


class MinioServer(Server):
    """A MinIO server process of its own: fixed port and data directory across stop() and start()."""

    def __init__(self, binary: Path, root: Path, access_key: str | None = None, secret_key: str | None = None) -> None:
        self.binary, self.data, self.log = binary, root / "data", root / "minio.log"
        self.port, self.console_port = processes.free_ports(2)
        self.endpoint = f"127.0.0.1:{self.port}"
        self.access_key = access_key or "test-" + secrets.token_hex(4)
        self.secret_key = secret_key or secrets.token_urlsafe(18)
        self.home = root / "home"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        env = {"PATH": os.environ.get("PATH", ""), "HOME": str(self.home), "MINIO_ROOT_USER": self.access_key,
               "MINIO_ROOT_PASSWORD": self.secret_key, "MINIO_BROWSER": "off", "MINIO_UPDATE": "off"}
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [str(self.binary), "server", str(self.data), "--quiet", f"--address={self.endpoint}",
                 f"--console-address=127.0.0.1:{self.console_port}"],
                env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )
        wait_for(self.ready, timeout=60, message=f"MinIO on {self.endpoint} (log: {self.log})")

    def ready(self) -> bool:
        import urllib.request

        assert self.process is not None
        if self.process.poll() is not None:
            raise AssertionError(f"MinIO exited with {self.process.returncode}: {self.log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"http://{self.endpoint}/minio/health/ready", timeout=2) as response:
                return bool(response.status == 200)
        except OSError:
            return False

    def client(self) -> Any:
        from minio import Minio

        return Minio(self.endpoint, access_key=self.access_key, secret_key=self.secret_key, secure=False)


def port_open(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0
