"""``python -m devcluster up|down|status``: the local cluster (devcluster.cluster)."""

import sys

from devcluster.cluster import main

sys.exit(main())
