#!/bin/bash
# Build the directory bcc gets as BCC_KERNEL_SOURCE: Debian splits kernel headers
# into linux-headers-<ver>-common and linux-headers-<ver>-amd64, and bcc needs
# them merged into one tree (either alone fails). A symlink farm costs no copy.
set -euo pipefail
dest=$1
amd64=$(ls -d /usr/src/linux-headers-*-amd64 2>/dev/null | sort -V | tail -1)
test -n "$amd64" || { echo "no /usr/src/linux-headers-*-amd64 (install linux-headers-amd64)" >&2; exit 1; }
common=${amd64%-amd64}-common
test -d "$common" || { echo "missing $common next to $amd64" >&2; exit 1; }
rm -rf "$dest"
mkdir -p "$dest"
cp -rs "$common/." "$dest/"
cp -rsf "$amd64/." "$dest/"
basename "$amd64" > "$dest/.complete"
