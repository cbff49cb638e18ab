#!/bin/bash
# Build weir-cni as a self-contained one-directory bundle: the node needs no
# Python. Output: build/cni-plugin/weir-cni/, holding
#   weir-cni      the C front end (cni_plugin/frontend.c): VERSION, ADD and DEL
#                 in about a millisecond, everything else handed to
#   weir-cni-py   the plugin frozen by PyInstaller (with its _internal/)
# The installer copies the whole directory and links weir-cni into the CNI bin dir.
# One-directory, not one-file: a one-file binary unpacks itself to /tmp on every
# run, which costs the ADD latency the runtime waits on and fails on noexec /tmp.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PY:-.venv/bin/python}
CC=${CC:-gcc}
OUT=build/cni-plugin
# Only the stdlib modules weir-cni imports go in; these are pulled in by
# PyInstaller's defaults yet never used by the plugin.
EXCLUDES=(tkinter unittest pydoc doctest email http xml xmlrpc sqlite3 ssl asyncio
	multiprocessing concurrent distutils setuptools pip lib2to3 curses readline bz2 lzma)

# Rebuild only when the plugin's sources or this script changed: a build takes
# seconds and every test session asks for one.
STAMP="$OUT/.sources.sha256"
sources=$(cat cni_plugin/*.py cni_plugin/*.c "$0" | sha256sum | cut -d' ' -f1)
if [[ -x "$OUT/weir-cni/weir-cni" && -f "$STAMP" && "$(cat "$STAMP")" == "$sources" ]]; then
	echo "up to date: $OUT/weir-cni/weir-cni"
	exit 0
fi

rm -rf "$OUT.tmp"
"$PY" -m PyInstaller --noconfirm --clean --onedir --name weir-cni-py \
	--distpath "$OUT.tmp/dist" --workpath "$OUT.tmp/work" --specpath "$OUT.tmp" \
	--paths . --log-level WARN \
	"${EXCLUDES[@]/#/--exclude-module=}" \
	cni_plugin/__main__.py
"$CC" -std=c11 -O2 -Wall -Wextra -Werror -o "$OUT.tmp/dist/weir-cni-py/weir-cni" \
	cni_plugin/frontend.c
# Replace the previous bundle only once the new one is complete.
rm -rf "$OUT"
mkdir -p "$OUT"
mv "$OUT.tmp/dist/weir-cni-py" "$OUT/weir-cni"
rm -rf "$OUT.tmp"
echo "$sources" >"$STAMP"
echo "built $OUT/weir-cni/weir-cni ($(du -sh "$OUT/weir-cni" | cut -f1))"
