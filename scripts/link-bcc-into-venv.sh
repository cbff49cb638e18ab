#!/bin/bash
# bcc's Python bindings come from Debian's python3-bpfcc (they must match the
# installed libbcc), not from PyPI. Expose only that one package to the venv,
# rather than all of Debian's dist-packages, so nothing else leaks in.
set -euo pipefail
py=$1
site=$("$py" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
src=/usr/lib/python3/dist-packages/bcc
test -d "$src" || { echo "bcc Python module missing at $src (install python3-bpfcc)" >&2; exit 1; }
ln -sfn "$src" "$site/bcc"
"$py" -c 'import bcc' || { echo "bcc does not import in $py" >&2; exit 1; }
