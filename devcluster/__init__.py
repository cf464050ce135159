"""The local development cluster: real Kubernetes components on one machine, no Docker.

    python -m devcluster up|down|status     the cluster (devcluster.cluster; `make cluster-up`)
    python -m devcluster.images build       the operator and trainer images (`make images`)
    python -m devcluster.demo up|down       the quickstart on the cluster (`make demo`)

The build recipes it runs (Go module pins, shell scripts, the pause image, containers.conf) stay
in hack/ (``HACK``).
"""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HACK = REPO / "hack"
