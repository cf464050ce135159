"""The operator image (`make images`) runs the operator against the local cluster: a podman container
with a read-only root filesystem, no capabilities, as an arbitrary uid without a passwd entry (the
image's own user, 65532, is checked in tests/images), under the chart's ServiceAccount."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.helpers import REPO, free_port, wait_for
from tests.support.jobs import finetunejob, wait_phase

pytestmark = [pytest.mark.e2e, pytest.mark.images]
CONTAINERS_CONF = REPO / "hack" / "containers.conf"
ARBITRARY_UID = 1000650000


def podman(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "CONTAINERS_CONF": str(CONTAINERS_CONF)}
    proc = subprocess.run(["podman", *args], capture_output=True, text=True, timeout=120, env=env)
    if check:
        assert proc.returncode == 0, f"podman {' '.join(args)}: {proc.stderr[-3000:]}"
    return proc


@pytest.fixture
def operator_container(cluster: Any, crd: None, namespace: str, operator_kubeconfig: Path, node: Any,
                       fake_trainer_env: dict[str, str], images: dict[str, str], tmp_path: Path) -> Iterator[str]:
    """`kubetune operator --namespace NS` from the operator image; settings in an env file, never in args."""
    health_port, report_port = free_port(), free_port()
    kubeconfig = tmp_path / "kubeconfig"
    shutil.copy(operator_kubeconfig, kubeconfig)
    kubeconfig.chmod(0o644)  # readable by the image's user; a bind-mounted file needs no path above it
    report_key = "k" * 43
    env_file = tmp_path / "operator.env"
    env_file.write_text("\n".join([
        "KUBECONFIG=/etc/kubetune/kubeconfig",
        f"KUBETUNE_LIVENESS_ENDPOINT=http://127.0.0.1:{health_port}/healthz",
        f"KUBETUNE_REPORT_LISTEN={node.host}:{report_port}",
        f"KUBETUNE_REPORT_URL=http://{node.host}:{report_port}",
        f"KUBETUNE_REPORT_KEY={report_key}",
        "KUBETUNE_STATUS_INTERVAL=1",
        "KUBETUNE_RESYNC_SECONDS=5",
        # The TEST DOUBLE trainer, in its image.
        *(f"{key}={value}" for key, value in fake_trainer_env.items()),
    ]) + "\n")
    env_file.chmod(0o600)
    name = f"kubetune-operator-{namespace}"
    # An arbitrary uid without a passwd entry (--passwd=false: podman adds none), as a cluster whose
    # policy picks the uid runs the image.
    podman("run", "--detach", "--name", name, "--network", "host", "--read-only", "--cap-drop", "ALL",
           "--user", f"{ARBITRARY_UID}:{ARBITRARY_UID}", "--passwd=false",
           "--security-opt", "no-new-privileges", "--env-file", str(env_file),
           "--volume", f"{kubeconfig}:/etc/kubetune/kubeconfig:ro",
           images["operator"], "--namespace", namespace)
    try:
        def healthy() -> bool:
            state = json.loads(podman("inspect", name).stdout)[0]["State"]
            assert state["Running"], f"operator container exited: {podman('logs', name).stderr[-3000:]}"
            with urllib.request.urlopen(f"http://127.0.0.1:{health_port}/healthz", timeout=2) as response:
                return bool(response.status == 200)

        wait_for(healthy, timeout=90, message="the operator container's liveness endpoint")
        yield name
    finally:
        logs = podman("logs", name, check=False)
        podman("rm", "--force", "--time", "10", name, check=False)
        assert report_key not in logs.stdout + logs.stderr


def test_operator_image_runs_a_job_to_success_locked_down(cluster: Any, namespace: str,
                                                          operator_container: str) -> None:
    cluster.apply(finetunejob("from-image"), namespace)
    status = wait_phase(cluster, namespace, "from-image", "Succeeded")
    assert status["jobName"] == "from-image-trainer" and status["progress"]["percent"] == 100

    container = json.loads(podman("inspect", operator_container).stdout)[0]
    assert container["HostConfig"]["ReadonlyRootfs"] is True
    assert container["EffectiveCaps"] in (None, [])
    assert podman("exec", operator_container, "id", "-u").stdout.strip() == str(ARBITRARY_UID)
    denied = podman("exec", operator_container, "touch", "/usr/local/x", check=False)
    assert denied.returncode != 0 and "Read-only file system" in denied.stderr
    logs = podman("logs", operator_container)
    assert "from-image" in logs.stdout + logs.stderr
