#!/usr/bin/env bash
# The Weir node image without an engine: the content deploy/Containerfile builds
# with docker, podman or buildah, written as an OCI archive (testbed.images)
# that `ctr images import` takes. Two layers:
#   base  Debian 12 (mmdebstrap) with deploy/image-packages.txt and a venv at
#         /opt/weir holding weir's dependencies; built once per change of those
#         and kept in ~/.cache/weir/images (a minute or two, hundreds of MB);
#   app   the weir wheel installed into that venv, and the weir-cni bundle
#         (make cni-plugin) at /opt/weir/cni/weir-cni, bpf/ at /opt/weir/bpf,
#         and the venv's OpenSSL 3.5 (scripts/build-openssl.sh, as .venv has
#         it) at /opt/weir/lib/weir-openssl; seconds, about 15 MB.
# Usage: build-weir-image.sh OUT.tar [TAG]   (TAG defaults to weir.test/weir:dev)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
out=${1:?usage: build-weir-image.sh OUT.tar [TAG]}
tag=${2:-weir.test/weir:dev}
cache="${XDG_CACHE_HOME:-$HOME/.cache}/weir/images"

mkdir -p build "$cache"
work=$(mktemp -d build/.weir-image.XXXXXX)
trap 'rm -rf "$work"' EXIT

"$PY" -c 'import tomllib; print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]))' \
    >"$work/requirements.txt"
# Everything that decides the base layer's content: its packages, weir's
# dependencies, and the recipe below (this file's base section).
key=$(cat deploy/image-packages.txt "$work/requirements.txt" \
    <(sed -n '/^# base: begin/,/^# base: end/p' "$0") | sha256sum | cut -c1-16)
base="$cache/weir-base-$key.tar"
# base: begin
if [ ! -f "$base" ]; then
    # Built here, where pip reaches PyPI through this machine's settings; the
    # image's root installs from them alone (with none of this machine's PIP_* settings).
    "$PY" -m pip wheel -q --disable-pip-version-check -w "$work/wheels" -r "$work/requirements.txt" </dev/null
    cp "$work/requirements.txt" "$work/wheels/"
    packages=$(paste -sd, deploy/image-packages.txt)
    mmdebstrap --quiet --variant=minbase --include="$packages" \
        --customize-hook='mkdir -p "$1/tmp/wheels"' \
        --customize-hook="sync-in $work/wheels /tmp/wheels" \
        --customize-hook='chroot "$1" python3 -m venv --system-site-packages /opt/weir' \
        --customize-hook='chroot "$1" env -i PATH=/usr/bin:/bin /opt/weir/bin/pip install -q \
            --disable-pip-version-check --no-index --find-links /tmp/wheels -r /tmp/wheels/requirements.txt' \
        --customize-hook='rm -rf "$1/tmp/wheels"' \
        bookworm "$work/rootfs.tar" \
        "deb http://deb.debian.org/debian bookworm main" \
        "deb http://deb.debian.org/debian-security bookworm-security main" </dev/null
    mv "$work/rootfs.tar" "$base.partial" && mv "$base.partial" "$base"
    find "$cache" -name 'weir-base-*.tar' ! -name "weir-base-$key.tar" -delete
fi
# base: end

# No build isolation: mypyc (setup.py) type-checks what it compiles against
# the dev environment's packages.
"$PY" -m pip wheel -q --disable-pip-version-check --no-deps --no-build-isolation \
    -w "$work/app-wheel" . </dev/null
# setuptools builds the project's wheel in build/lib and build/bdist.*: not ours to keep.
rm -rf build/lib build/bdist.linux-x86_64
"$PY" - "$base" "$work" "$out" "$tag" <<'PY'
import shutil
import sys
from pathlib import Path

from installer import install
from installer.destinations import SchemeDictionaryDestination
from installer.sources import WheelFile

from testbed.images import DEBIAN_PATH, build_rootfs_image, write_directory_layer
from weir_common import openssl_runtime

base, work, out, tag = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[4]
root = work / "app"
venv = "/opt/weir"
# Debian 12's Python, as the base's venv has it.
site = f"{venv}/lib/python3.11/site-packages"
scheme = {key: f"{root}{site}" for key in ("purelib", "platlib")}
scheme |= {"headers": f"{root}{venv}/include", "scripts": f"{root}{venv}/bin", "data": f"{root}{venv}"}
destination = SchemeDictionaryDestination(
    scheme, interpreter=f"{venv}/bin/python", script_kind="posix"
)
(wheel,) = (work / "app-wheel").glob("weir-*.whl")
with WheelFile.open(wheel) as source:
    install(source, destination, additional_metadata={"INSTALLER": b"build-weir-image\n"})
shutil.copytree("build/cni-plugin/weir-cni", root / "opt/weir/cni/weir-cni", symlinks=True)
# The eBPF programs' C sources, which bcc compiles on the node (WEIR_BPF_DIR).
shutil.copytree("bpf", root / "opt/weir/bpf")
# The OpenSSL the venv's Python runs on (scripts/build-openssl.sh), and the hook
# that loads it at interpreter start; the same pair `make deps` puts in .venv.
shutil.copytree(openssl_runtime.library_dir(), openssl_runtime.library_dir(f"{root}{venv}"))
openssl_runtime.write_hook(Path(f"{root}{site}"))
write_directory_layer(root, work / "app.tar")
build_rootfs_image(
    [Path(base), work / "app.tar"],
    out,
    tag,
    entrypoint=[f"{venv}/bin/weir"],
    # weir on the PATH, so `kubectl exec ... -- weir node status` works.
    env=[DEBIAN_PATH.replace("PATH=", f"PATH={venv}/bin:")],
)
PY
echo "$out: $tag, $(du -h "$out" | cut -f1)"
