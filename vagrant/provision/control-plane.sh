#!/usr/bin/env bash
# The control plane: kubeadm init (once), the admin kubeconfig for the vagrant
# user and for the host, and a fresh join command for the workers, both
# written to SHARE_DIR, the shared folder. Safe to run again: a second run
# only mints a new join command (its token lives 2 hours).
# Usage: control-plane.sh KUBERNETES_VERSION NODE_IP POD_CIDR SHARE_DIR
set -euo pipefail

usage="usage: control-plane.sh KUBERNETES_VERSION NODE_IP POD_CIDR SHARE_DIR"
version=${1:?$usage}
node_ip=${2:?$usage}
pod_cidr=${3:?$usage}
share_dir=${4:?$usage}
if [[ ! $pod_cidr =~ ^([0-9]{1,3}\.){3}[0-9]{1,3}/[0-9]{1,2}$ ]]; then
    echo "control-plane.sh: POD_CIDR must be an IPv4 CIDR, not '$pod_cidr'" >&2
    exit 2
fi
export KUBECONFIG=/etc/kubernetes/admin.conf

if [[ ! -f $KUBECONFIG ]]; then
    kubeadm init \
        --kubernetes-version "v$version" \
        --apiserver-advertise-address "$node_ip" \
        --pod-network-cidr "$pod_cidr"
fi

install -d -m 0700 -o vagrant -g vagrant /home/vagrant/.kube
install -m 0600 -o vagrant -g vagrant "$KUBECONFIG" /home/vagrant/.kube/config

# The bootstrap token and the admin credentials are secrets: created owner-only
# (by umask, not chmod, which some shared folder types refuse), renamed into
# place so a waiting worker never reads half a file.
(
    umask 077
    mkdir -p "$share_dir"
    cp "$KUBECONFIG" "$share_dir/admin.conf.new"
    mv "$share_dir/admin.conf.new" "$share_dir/admin.conf"
    kubeadm token create --ttl 2h --print-join-command >"$share_dir/join-command.new"
    mv "$share_dir/join-command.new" "$share_dir/join-command"
)
echo "control plane $(hostname) at https://$node_ip:6443; join command in $share_dir/join-command"
