"""A real Prometheus (Debian's, installed with the node's tools) for the tests: it loads the chart's
alert rules and scrapes whatever target a test points it at (file-based service discovery), every
second; queries and alerts come from its HTTP API."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from devcluster import processes
from tests.support.helpers import wait_for

REPO = Path(__file__).resolve().parents[2]
RULES = REPO / "helm" / "kubetune" / "files" / "prometheus-rules.yaml"


class Prometheus:
    def __init__(self, root: Path) -> None:
        binary = shutil.which("prometheus") or "/usr/bin/prometheus"
        self.root, self.binary = root, binary
        (self.port,) = processes.free_ports(1)
        self.url = f"http://127.0.0.1:{self.port}"
        self.targets = root / "targets.json"
        self.targets.write_text("[]")
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(RULES)],
            "scrape_configs": [{"job_name": "kubetune-operator", "scrape_interval": "1s",
                                "file_sd_configs": [{"files": [str(self.targets)], "refresh_interval": "1s"}]}],
        }
        (root / "prometheus.yml").write_text(json.dumps(config))  # JSON is YAML
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with (self.root / "prometheus.log").open("ab") as log:
            self.process = subprocess.Popen(
                [self.binary, f"--config.file={self.root / 'prometheus.yml'}",
                 f"--storage.tsdb.path={self.root / 'data'}", f"--web.listen-address=127.0.0.1:{self.port}"],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        wait_for(self._ready, timeout=60, message=f"Prometheus on {self.url}")

    def _ready(self) -> bool:
        assert self.process is not None and self.process.poll() is None, \
            (self.root / "prometheus.log").read_text()[-2000:]
        with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as response:
            return bool(response.status == 200)

    def scrape(self, url: str) -> None:
        """Scrape `url` (http://host:port, its /metrics) from now on, and nothing else."""
        address = urllib.parse.urlsplit(url).netloc
        partial = self.targets.with_suffix(".partial")
        partial.write_text(json.dumps([{"targets": [address]}]))
        os.replace(partial, self.targets)
        wait_for(lambda: self.query(f'up{{instance="{address}"}} == 1'), timeout=60,
                 message=f"Prometheus scraping {address}")

    def api(self, path: str, **params: str) -> Any:
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        with urllib.request.urlopen(f"{self.url}/api/v1/{path}{query}", timeout=10) as response:
            body = json.loads(response.read())
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> list[Any]:
        return list(self.api("query", query=expr)["result"])

    def firing(self, alert: str) -> list[Any]:
        return [a for a in self.api("alerts")["alerts"] if a["labels"]["alertname"] == alert and a["state"] == "firing"]

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(timeout=30)
            self.process = None

