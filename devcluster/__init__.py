"""The local development cluster: real Kubernetes components on one machine, no Docker.

    python -m devcluster up|down|status     the cluster (devcluster.cluster; `make cluster-up`)
    python -m devcluster.images build       the operator and trainer images (`make images`)
    python -m devcluster.demo up|down       the quickstart on the cluster (`make demo`)

The build recipes it runs (Go module pins, shell scripts, the pause image, containers.conf) stay
in hack/ (``HACK``).
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HACK = REPO / "hack"
SERVICE_CIDR = "10.0.0.0/24"
SERVICE_IP = "10.0.0.1"  # first address of SERVICE_CIDR: the `kubernetes` Service
DNS_SERVICE_IP = "10.0.0.10"  # the real node's `kube-dns` Service (CoreDNS)
NODE_NAME = "kubetune-local"
CLUSTER_NAME = "kubetune-local"


def log(message: str) -> None:
    print(f"cluster: {message}", file=sys.stderr, flush=True)
