"""``python -m devcluster up|down|status``: the local cluster (devcluster.cluster)."""

from devcluster.cluster import main

main()
