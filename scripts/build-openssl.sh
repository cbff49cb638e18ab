#!/usr/bin/env bash
# The OpenSSL the node proxy's TLS runs on: libssl.so.3 and libcrypto.so.3 of
# OpenSSL 3.5 (LTS), built from the upstream release and copied into DEST.
#
# Why not Debian 12's own: its OpenSSL 3.0 has no VAES/AVX-512 AES-GCM, so on
# CPUs that have those instructions (the development VM's AMD EPYC does) bulk
# encryption runs at about a third of the speed OpenSSL 3.5 reaches (docs/proxy.md,
# "The OpenSSL underneath"). Python's ssl module is built against OpenSSL 3's
# ABI, which holds across 3.x, so it runs on these libraries unchanged;
# weir_common/openssl_runtime.py loads them at interpreter start.
#
# Built once per user into ~/.cache/weir/openssl (about 80 s on two
# cores); a fresh clone finds it there. The tarball is Debian's copy of the
# upstream release, checked against the SHA-256 Debian publishes for it.
# Usage: build-openssl.sh DEST [PYTHON]   (PYTHON: the interpreter that will
# load them, default Debian's /usr/bin/python3; its modules' needs are checked)
set -euo pipefail
dest=${1:?usage: build-openssl.sh DEST [PYTHON]}
python=${2:-/usr/bin/python3}

version=3.5.7
url="http://deb.debian.org/debian/pool/main/o/openssl/openssl_${version}.orig.tar.gz"
sha256=a8c0d28a529ca480f9f36cf5792e2cd21984552a3c8e4aa11a24aa31aeac98e8
# Only what the proxy, Python's ssl and hashlib modules use: TLS 1.3 and 1.2
# with the common ciphers and hashes, no command-line tool, no loadable
# providers or engines, none of QUIC, DTLS, CMS, OCSP, CT, SRP or the rarer
# algorithms. Each part left out is resident memory a node proxy does not pay
# (about 1 MiB against a full build). kTLS is OpenSSL's to enable at build
# time, as Debian does. OPENSSLDIR is Debian's, so the system's openssl.cnf
# and certificate directories apply as they do to Debian's OpenSSL.
configure=(linux-x86_64 shared enable-ktls no-tests no-docs no-apps no-legacy no-module
    no-quic no-srp no-srtp no-dtls no-cms no-ts no-cmp no-ocsp no-ct no-engine no-gost
    no-sm2 no-sm3 no-sm4 no-aria no-camellia no-idea no-seed no-bf no-cast no-rc2 no-rc4
    no-rc5 no-mdc2 no-whirlpool no-md4 no-siphash no-ec2m no-ssl-trace no-slh-dsa no-ml-dsa
    no-argon2 no-siv no-ssl3 no-weak-ssl-ciphers
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
    # Every OpenSSL symbol Python's _ssl and _hashlib import must be here, at
    # the version they ask for: what was left out above must not be used.
    modules=$("$python" -S -c 'import _hashlib, _ssl; print(_ssl.__file__, _hashlib.__file__)')
    # shellcheck disable=SC2086 # two paths without spaces
    nm -D --undefined-only $modules | awk '$2 ~ /@OPENSSL/ {print $2}' | sort -u >"$work/needed"
    nm -D --defined-only "$work/out/libcrypto.so.3" "$work/out/libssl.so.3" \
        | awk 'NF == 3 {sub("@@", "@", $3); print $3}' | sort -u >"$work/defined"
    missing=$(comm -23 "$work/needed" "$work/defined")
    if [ -n "$missing" ]; then
        echo "OpenSSL $version as configured lacks what $python's ssl and hashlib need:" >&2
        echo "$missing" >&2
        exit 1
    fi
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
