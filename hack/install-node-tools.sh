#!/usr/bin/env bash
# Installs what the node of the local cluster (kubelet + containerd) needs from Debian:
# containerd (+ ctr), runc, the CNI plugins, buildah (builds the pause and test images) and
# busybox-static (the test image's only binary), and Prometheus (promtool checks the chart's alerts;
# the tests' Prometheus scrapes the operator). Installs only what is missing; a second run does
# nothing. devcluster/cluster.py runs it before starting the node.
set -euo pipefail

declare -A wanted=(
  [containerd]=/usr/bin/containerd
  [runc]=/usr/sbin/runc
  [containernetworking-plugins]=/usr/lib/cni/bridge
  [buildah]=/usr/bin/buildah
  [busybox-static]=/bin/busybox
  [iptables]=/usr/sbin/iptables
  [prometheus]=/usr/bin/prometheus
)
missing=()
for package in "${!wanted[@]}"; do
  # busybox (dynamic) also provides /bin/busybox; the test image needs the static one.
  if [ "$package" = busybox-static ]; then
    dpkg-query -W -f='${Status}' busybox-static 2>/dev/null | grep -q "install ok installed" || missing+=("$package")
  elif [ ! -x "${wanted[$package]}" ]; then
    missing+=("$package")
  fi
done
[ ${#missing[@]} -eq 0 ] && exit 0

echo "install-node-tools: installing ${missing[*]}" >&2
if [ "$(id -u)" -ne 0 ]; then
  echo "install-node-tools: needs root (apt-get install -y ${missing[*]})" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
if ! apt-get install -y --no-install-recommends "${missing[@]}" >&2; then
  apt-get update >&2
  apt-get install -y --no-install-recommends "${missing[@]}" >&2
fi
