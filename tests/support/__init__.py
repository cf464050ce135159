"""What the tests (and the benches) share, imported as ``tests.support.<module>``:

- ``helpers``: the repository, ``wait_for``, free ports, the cluster handle (``Cluster``, ``Node``),
  ``python -m devcluster``;
- ``jobs``: the operator as a child process, FineTuneJob manifests, waits on their status;
- ``trainer``: the tiny trainer configs and a private MinIO server;
- ``faults``: fault-injecting servers (a black-hole proxy, a hostile config.json server).
"""
