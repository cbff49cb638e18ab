#!/usr/bin/env bash
# Every node: kernel modules and sysctls Kubernetes needs, containerd with the
# systemd cgroup driver, and kubelet, kubeadm, kubectl from pkgs.k8s.io pinned
# to one release and held. Safe to run again (vagrant provision).
# Usage: common.sh KUBERNETES_VERSION NODE_IP   (e.g. 1.34.4 192.168.56.10)
set -euo pipefail

version=${1:?usage: common.sh KUBERNETES_VERSION NODE_IP}
node_ip=${2:?usage: common.sh KUBERNETES_VERSION NODE_IP}
if [[ ! $version =~ ^1\.[0-9]+\.[0-9]+$ ]]; then
    echo "common.sh: KUBERNETES_VERSION must be a release like 1.34.4, not '$version'" >&2
    exit 2
fi
if [[ ! $node_ip =~ ^([0-9]{1,3}\.){3}[0-9]{1,3}$ ]]; then
    echo "common.sh: NODE_IP must be an IPv4 address, not '$node_ip'" >&2
    exit 2
fi
if ! ip -4 -o addr show | grep -q " inet $node_ip/"; then
    echo "common.sh: no interface of $(hostname) has $node_ip (check the private_network of the Vagrantfile)" >&2
    exit 1
fi
channel=v${version%.*}
export DEBIAN_FRONTEND=noninteractive

# The kubelet refuses to start with swap on unless told how to use it.
swapoff -a
sed -ri '/^[^#].*\sswap\s/s/^/# /' /etc/fstab

cat >/etc/modules-load.d/kubernetes.conf <<'CONF'
overlay
br_netfilter
CONF
modprobe overlay
modprobe br_netfilter
# Bridged pod traffic must go through iptables (kube-proxy's Service rules)
# and nodes route between pods.
cat >/etc/sysctl.d/90-kubernetes.conf <<'CONF'
net.bridge.bridge-nf-call-iptables = 1
net.bridge.bridge-nf-call-ip6tables = 1
net.ipv4.ip_forward = 1
CONF
sysctl --quiet --system

apt-get update -qq
apt-get install -y -qq --no-install-recommends \
    ca-certificates curl gpg iptables containerd runc </dev/null

install -d -m 0755 /etc/apt/keyrings
curl -fsSL --retry 3 "https://pkgs.k8s.io/core:/stable:/$channel/deb/Release.key" |
    gpg --dearmor --yes -o /etc/apt/keyrings/kubernetes-apt-keyring.gpg
echo "deb [signed-by=/etc/apt/keyrings/kubernetes-apt-keyring.gpg] https://pkgs.k8s.io/core:/stable:/$channel/deb/ /" \
    >/etc/apt/sources.list.d/kubernetes.list
apt-get update -qq
# The package revision (the -1.1 of 1.34.4-1.1) is the repository's business.
package_version=$(apt-cache madison kubeadm | awk -v v="$version" '$3 ~ "^" v "-" { print $3; exit }')
if [[ -z $package_version ]]; then
    echo "common.sh: pkgs.k8s.io's $channel channel has no kubeadm $version" >&2
    exit 1
fi
apt-get install -y -qq --no-install-recommends --allow-change-held-packages \
    "kubelet=$package_version" "kubeadm=$package_version" "kubectl=$package_version" \
    kubernetes-cni cri-tools </dev/null
apt-mark hold kubelet kubeadm kubectl >/dev/null

# kubeadm configures the kubelet for the systemd cgroup driver, so containerd
# must use it too; and the sandbox (pause) image must be the one this kubeadm
# expects, not containerd's built-in default.
pause_image=$(kubeadm config images list --kubernetes-version "v$version" | grep '/pause:')
install -d -m 0755 /etc/containerd
containerd config default >/etc/containerd/config.toml.new
sed -i \
    -e 's/^\(\s*SystemdCgroup\s*=\s*\)false$/\1true/' \
    -e "s#^\(\s*sandbox_image\s*=\s*\).*#\1\"$pause_image\"#" \
    /etc/containerd/config.toml.new
if ! grep -q 'SystemdCgroup = true' /etc/containerd/config.toml.new ||
    ! grep -q "sandbox_image = \"$pause_image\"" /etc/containerd/config.toml.new; then
    echo "common.sh: containerd's default configuration changed shape; SystemdCgroup or sandbox_image not set" >&2
    rm -f /etc/containerd/config.toml.new
    exit 1
fi
mv /etc/containerd/config.toml.new /etc/containerd/config.toml
systemctl enable --quiet containerd
systemctl restart containerd
cat >/etc/crictl.yaml <<'CONF'
runtime-endpoint: unix:///run/containerd/containerd.sock
image-endpoint: unix:///run/containerd/containerd.sock
CONF

# The first interface is the provider's NAT, the same address on every
# VirtualBox node: the kubelet must advertise the private network's address.
echo "KUBELET_EXTRA_ARGS=--node-ip=$node_ip" >/etc/default/kubelet
systemctl enable --quiet kubelet
if systemctl is-active --quiet kubelet; then
    systemctl restart kubelet
fi
