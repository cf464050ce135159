"""``python -m devcluster up|down|status|stop NAME|start NAME``: the local cluster (devcluster.cluster).

The modules: cluster.py (up, down, repair, the node), control_plane.py (each component's flags),
kueue.py, pki.py (certificates), processes.py (directory, state file, processes), binaries.py."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from devcluster import cluster, log
from devcluster.cluster import DEFAULT_DIR, cluster_down, cluster_status, cluster_up, start_service, stop_service
from devcluster.kueue import kueue_from_env
from devcluster.processes import Paths, exclusive


def env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=cluster.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["up", "down", "status", "stop", "start"])
    parser.add_argument("service", nargs="?", help="stop/start: one process of the cluster (e.g. minio)")
    parser.add_argument("--dir", type=Path, default=Path(os.environ.get("KUBETUNE_CLUSTER_DIR", DEFAULT_DIR)),
                        help="state directory of this cluster instance (default: .kubetune/)")
    parser.add_argument("--gpus", type=int, default=int(os.environ.get("KUBETUNE_NODE_GPUS", "2")),
                        help="nvidia.com/gpu capacity of the local node (default 2)")
    parser.add_argument("--kueue", action=argparse.BooleanOptionalAction, default=kueue_from_env(),
                        help="up: start Kueue with the cluster (default: yes unless KUBETUNE_KUEUE=0)")
    parser.add_argument("--json", action="store_true", help="status: print JSON")
    args = parser.parse_args(argv)
    paths = Paths(args.dir.resolve())

    if env_flag("USE_EXISTING_CLUSTER") and args.command != "status":
        log("USE_EXISTING_CLUSTER=true: using the current kubeconfig's cluster; nothing to start or stop")
        return 0
    if args.command in ("stop", "start"):
        if not args.service:
            parser.error(f"{args.command} needs a process name, e.g. minio")
        with exclusive(paths.root / ".lock"):
            (stop_service if args.command == "stop" else start_service)(paths, args.service)
        return 0
    if args.command in ("up", "down"):
        with exclusive(paths.root / ".lock"):
            if args.command == "down":
                cluster_down(paths)
                return 0
            try:
                cluster_up(paths, args.gpus, kueue=args.kueue)
            except (TimeoutError, RuntimeError, subprocess.CalledProcessError) as error:
                log(f"up failed: {error}")
                return 1
    else:
        status = cluster_status(paths)
        if args.json:
            print(json.dumps(status, indent=2))
        else:
            print("up" if status["up"] else "down", status.get("apiserver", ""))
            for name, proc in status.get("processes", {}).items():
                print(f"  {name:<24} pid {proc['pid']:<8} {'running' if proc['alive'] else 'exited'}")
        return 0 if status["up"] else 1
    return 0


sys.exit(main())
