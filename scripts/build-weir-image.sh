#!/usr/bin/env bash
# The Weir node image without an engine: the content deploy/Containerfile builds
# with docker, podman or buildah, assembled from Debian's packages (mmdebstrap),
# the project's wheels and the weir-cni bundle (make cni-plugin), and written as
# an OCI archive (testbed.images) that `ctr images import` takes.
# Usage: build-weir-image.sh OUT.tar [TAG]   (TAG defaults to weir.test/weir:dev)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
out=${1:?usage: build-weir-image.sh OUT.tar [TAG]}
tag=${2:-weir.test/weir:dev}

mkdir -p build
work=$(mktemp -d build/.weir-image.XXXXXX)
trap 'rm -rf "$work"' EXIT
# Built here, where pip reaches PyPI through this machine's settings; the
# image's root installs from them alone (with none of this machine's PIP_* settings).
"$PY" -m pip wheel -q --disable-pip-version-check -w "$work/wheels" . </dev/null
# setuptools builds the project's wheel in build/lib and build/bdist.*: not ours to keep.
rm -rf build/lib build/bdist.linux-x86_64
packages=$(paste -sd, deploy/image-packages.txt)
mmdebstrap --quiet --variant=minbase --include="$packages" \
    --customize-hook='mkdir -p "$1/tmp/wheels" "$1/opt/weir/cni/weir-cni"' \
    --customize-hook="sync-in $work/wheels /tmp/wheels" \
    --customize-hook="sync-in build/cni-plugin/weir-cni /opt/weir/cni/weir-cni" \
    --customize-hook='chroot "$1" python3 -m venv --system-site-packages /opt/weir' \
    --customize-hook='chroot "$1" env -i PATH=/usr/bin:/bin /opt/weir/bin/pip install -q \
        --disable-pip-version-check --no-index --find-links /tmp/wheels weir' \
    --customize-hook='rm -rf "$1/tmp/wheels"' \
    bookworm "$work/rootfs.tar" \
    "deb http://deb.debian.org/debian bookworm main" \
    "deb http://deb.debian.org/debian-security bookworm-security main" </dev/null
"$PY" - "$work/rootfs.tar" "$out" "$tag" <<'PY'
import sys
from pathlib import Path

from testbed.images import build_rootfs_image

rootfs, out, tag = sys.argv[1:]
build_rootfs_image(Path(rootfs), Path(out), tag, entrypoint=["/opt/weir/bin/weir"])
PY
echo "$out: $tag, $(du -h "$out" | cut -f1)"
