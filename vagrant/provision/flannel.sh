#!/usr/bin/env bash
# The primary CNI: flannel from its release manifest, with the pod network set
# to POD_CIDR and its interface chosen by the route to REACH_IP (the control
# plane's private address), not the provider's NAT interface that every node
# has with the same address. Waits, bounded, until the node is Ready.
# Usage: flannel.sh FLANNEL_VERSION POD_CIDR REACH_IP
set -euo pipefail

usage="usage: flannel.sh FLANNEL_VERSION POD_CIDR REACH_IP"
flannel_version=${1:?$usage}
pod_cidr=${2:?$usage}
reach_ip=${3:?$usage}
if [[ ! $flannel_version =~ ^v[0-9]+\.[0-9]+\.[0-9]+$ ]]; then
    echo "flannel.sh: FLANNEL_VERSION must be a release tag like v0.27.2, not '$flannel_version'" >&2
    exit 2
fi
export KUBECONFIG=/etc/kubernetes/admin.conf

manifest=$(mktemp --suffix=.yaml)
trap 'rm -f "$manifest"' EXIT
curl -fsSL --retry 3 -o "$manifest" \
    "https://github.com/flannel-io/flannel/releases/download/$flannel_version/kube-flannel.yml"
# Edit the two lines we know, and refuse a manifest where either is missing
# rather than apply one that silently ignores our settings.
default_network='"Network": "10.244.0.0/16"'
subnet_arg='^\( *\)- --kube-subnet-mgr$'
if ! grep -qF "$default_network" "$manifest" || ! grep -q "$subnet_arg" "$manifest"; then
    echo "flannel.sh: the $flannel_version manifest has no '$default_network' or '- --kube-subnet-mgr' line to edit" >&2
    exit 1
fi
sed -i \
    -e "s#$default_network#\"Network\": \"$pod_cidr\"#" \
    -e "s#$subnet_arg#&\n\1- --iface-can-reach=$reach_ip#" \
    "$manifest"
kubectl apply -f "$manifest"
kubectl -n kube-flannel rollout status daemonset/kube-flannel-ds --timeout=300s
kubectl wait --for=condition=Ready "node/$(hostname)" --timeout=300s
