#!/usr/bin/env bash
# A worker: waits (bounded) for the control plane's join command in the shared
# folder, checks that it is exactly a kubeadm join with a token and a CA hash
# (it is never run as a script), and joins. A worker that already joined is
# left alone.
# Usage: worker.sh SHARE_DIR
set -euo pipefail

share_dir=${1:?usage: worker.sh SHARE_DIR}
join_file=$share_dir/join-command
# Providers that start machines in parallel (libvirt) provision the workers
# while the control plane is still in kubeadm init.
wait_seconds=1200

if [[ -f /etc/kubernetes/kubelet.conf ]]; then
    echo "$(hostname) already joined"
    exit 0
fi

for ((waited = 0; waited < wait_seconds; waited += 10)); do
    [[ -s $join_file ]] && break
    if ((waited % 60 == 0)); then
        echo "waiting for the control plane's join command at $join_file"
    fi
    sleep 10
done
if [[ ! -s $join_file ]]; then
    echo "worker.sh: no join command at $join_file after ${wait_seconds}s; is the control plane up? (vagrant provision cp)" >&2
    exit 1
fi

line=$(<"$join_file")
pattern='^kubeadm join ([0-9.]+:[0-9]+) --token ([a-z0-9]{6}\.[a-z0-9]{16}) --discovery-token-ca-cert-hash (sha256:[0-9a-f]{64}) *$'
if [[ ! $line =~ $pattern ]]; then
    echo "worker.sh: $join_file is not a kubeadm join command with a token and a CA hash" >&2
    exit 1
fi
if ! kubeadm join "${BASH_REMATCH[1]}" \
    --token "${BASH_REMATCH[2]}" \
    --discovery-token-ca-cert-hash "${BASH_REMATCH[3]}"; then
    echo "worker.sh: kubeadm join failed; an expired token or one from an earlier cluster? mint a new one with 'vagrant provision cp --provision-with control-plane', run 'sudo kubeadm reset -f' here, then 'vagrant provision $(hostname)'" >&2
    exit 1
fi
