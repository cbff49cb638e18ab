#!/usr/bin/env bash
# The OpenSSL the node proxy's TLS runs on: libssl.so.3 and libcrypto.so.3 of
# OpenSSL 3.5 (LTS), built from the upstream release and copied into DEST.
#
# Why not Debian 12's own: its OpenSSL 3.0 has no VAES/AVX-512 AES-GCM, so on
# the CPUs that have it (AMD Zen 4 and later, Intel Ice Lake and later) bulk
# encryption runs at about half the speed OpenSSL 3.5 reaches (docs/proxy.md,
# "The OpenSSL underneath"). Python's ssl module is built against OpenSSL 3's
# ABI, which holds across 3.x, so it runs on these libraries unchanged;
# weir_common/openssl_runtime.py loads them at interpreter start.
#
# Built once per user into ~/.cache/weir/openssl (about two minutes on two
# cores); a fresh clone finds it there. The tarball is Debian's copy of the
# upstream release, checked against the SHA-256 Debian publishes for it.
# Usage: build-openssl.sh DEST
set -euo pipefail
dest=${1:?usage: build-openssl.sh DEST}

version=3.5.7
url="http://deb.debian.org/debian/pool/main/o/openssl/openssl_${version}.orig.tar.gz"
sha256=a8c0d28a529ca480f9f36cf5792e2cd21984552a3c8e4aa11a24aa31aeac98e8
# Only what Python's ssl and hashlib modules use: no command-line tool, no
# loadable providers or engines. OPENSSLDIR is Debian's, so the system's
# openssl.cnf and certificate directories apply as they do to Debian's OpenSSL.
configure=(linux-x86_64 shared no-tests no-docs no-apps no-legacy no-module
    --openssldir=/usr/lib/ssl --libdir=lib)
libraries=(libcrypto.so.3 libssl.so.3)

key=$(printf '%s\n' "$version" "$sha256" "${configure[@]}" | sha256sum | cut -c1-16)
cache="${XDG_CACHE_HOME:-$HOME/.cache}/weir/openssl/$version-$key"

if [ ! -f "$cache/libssl.so.3" ]; then
    work=$(mktemp -d "${TMPDIR:-/tmp}/weir-openssl.XXXXXX")
    trap 'rm -rf "$work"' EXIT
    echo "building OpenSSL $version into $cache (once per user)"
    curl -fsS --retry 3 -o "$work/openssl.tar.gz" "$url" </dev/null
    echo "$sha256  $work/openssl.tar.gz" | sha256sum --check --quiet
    tar -xzf "$work/openssl.tar.gz" -C "$work"
    (
        cd "$work/openssl-$version"
        ./Configure "${configure[@]}" >"$work/configure.log" 2>&1 \
            || { tail -20 "$work/configure.log" >&2; exit 1; }
        make -j"$(nproc)" build_libs >"$work/make.log" 2>&1 \
            || { grep -m5 -B2 -i 'error' "$work/make.log" >&2; exit 1; }
    )
    mkdir -p "$work/out"
    for library in "${libraries[@]}"; do
        cp "$work/openssl-$version/$library" "$work/out/"
    done
    mkdir -p "$(dirname "$cache")"
    rm -rf "$cache.partial"
    mv "$work/out" "$cache.partial" && mv "$cache.partial" "$cache"
    find "$(dirname "$cache")" -mindepth 1 -maxdepth 1 ! -name "$version-$key" -exec rm -rf {} +
fi

mkdir -p "$dest"
for library in "${libraries[@]}"; do
    install -m 0644 "$cache/$library" "$dest/$library.new"
    mv "$dest/$library.new" "$dest/$library"
done
