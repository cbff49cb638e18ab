"""OCI images built without an engine or a registry.

No Docker engine runs on the test machines and no registry is reachable, so
the images tests run are written here as OCI image layout tars, which
`ctr images import` takes as they are: small ones from Debian's
busybox-static (one layer made here), and whole root filesystems made by
mmdebstrap (scripts/build-weir-image.sh), whose tar becomes the bottom layer
under a small one of the project's own files.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import tarfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import MappingProxyType
from typing import IO, Final

BUSYBOX: Final = Path("/bin/busybox")
# What the tests' containers call; each is a link to the one static binary.
APPLETS: Final = (
    "sh", "ip", "readlink", "echo", "cat", "sleep", "nc", "httpd", "wget", "hostname",
    "ls", "ps", "grep", "kill", "env", "nslookup", "timeout",
)  # fmt: skip
DEBIAN_PATH: Final = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _add_file(tar: tarfile.TarFile, name: str, source: Path) -> None:
    data = source.read_bytes()
    info = tarfile.TarInfo(name)
    info.size, info.mode = len(data), 0o755
    tar.addfile(info, io.BytesIO(data))


def _busybox_layer(applets: Sequence[str], files: Mapping[str, Path]) -> bytes:
    layer = io.BytesIO()
    with tarfile.open(fileobj=layer, mode="w") as tar:
        for directory in ("bin", "proc", "sys", "dev", "etc", "tmp", "var", "var/run"):
            info = tarfile.TarInfo(directory)
            info.type, info.mode = tarfile.DIRTYPE, 0o755
            tar.addfile(info)
        _add_file(tar, "bin/busybox", BUSYBOX)
        for applet in applets:
            info = tarfile.TarInfo(f"bin/{applet}")
            info.type, info.linkname = tarfile.SYMTYPE, "busybox"
            tar.addfile(info)
        for name, source in files.items():
            _add_file(tar, name, source)
    return layer.getvalue()


def _write_layout(
    out: Path,
    name: str,
    image_config: Mapping[str, object],
    layers: Sequence[tuple[str, int, IO[bytes]]],
) -> None:
    """The OCI layout tar of an image: each layer is (digest, size, its bytes), bottom first."""
    config = json.dumps(
        {
            "architecture": "amd64",
            "os": "linux",
            "config": dict(image_config),
            # Uncompressed, so a layer's digest is also its diff id.
            "rootfs": {"type": "layers", "diff_ids": [digest for digest, _, _ in layers]},
        }
    ).encode()
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": _digest(config),
                "size": len(config),
            },
            "layers": [
                {"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": d, "size": n}
                for d, n, _ in layers
            ],
        }
    ).encode()
    index = json.dumps(
        {
            "schemaVersion": 2,
            "manifests": [
                {
                    "mediaType": "application/vnd.oci.image.manifest.v1+json",
                    "digest": _digest(manifest),
                    "size": len(manifest),
                    "platform": {"architecture": "amd64", "os": "linux"},
                    "annotations": {"io.containerd.image.name": name},
                }
            ],
        }
    ).encode()
    with tarfile.open(out, "w") as tar:
        entries = [("oci-layout", b'{"imageLayoutVersion": "1.0.0"}'), ("index.json", index)]
        entries += [(f"blobs/sha256/{_digest(b)[7:]}", b) for b in (config, manifest)]
        for entry, data in entries:
            info = tarfile.TarInfo(entry)
            info.size, info.mode = len(data), 0o644
            tar.addfile(info, io.BytesIO(data))
        for layer_digest, layer_size, layer_data in layers:
            info = tarfile.TarInfo(f"blobs/sha256/{layer_digest[7:]}")
            info.size, info.mode = layer_size, 0o644
            tar.addfile(info, layer_data)


def build_busybox_image(
    out: Path,
    name: str,
    *,
    entrypoint: Sequence[str] = (),
    cmd: Sequence[str] = ("/bin/sh",),
    applets: Sequence[str] = APPLETS,
    files: Mapping[str, Path] = MappingProxyType({}),
) -> None:
    """Write an OCI image layout tar named `name`: /bin/busybox and links for `applets`.

    `files` adds executables: path in the image (no leading slash) -> file here.
    """
    layer = _busybox_layer(applets, files)
    image_config: dict[str, object] = {"Env": ["PATH=/bin"], "Cmd": list(cmd)}
    if entrypoint:
        image_config["Entrypoint"] = list(entrypoint)
    _write_layout(out, name, image_config, [(_digest(layer), len(layer), io.BytesIO(layer))])


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return "sha256:" + digest.hexdigest()


def build_rootfs_image(
    layers: Sequence[Path],
    out: Path,
    name: str,
    *,
    entrypoint: Sequence[str],
    env: Sequence[str] = (DEBIAN_PATH,),
) -> None:
    """Write an OCI image layout tar named `name` from layer tars, bottom first.

    Layers (a whole Debian root is hundreds of MB) are streamed, never held in memory.
    """
    image_config = {"Env": list(env), "Entrypoint": list(entrypoint)}
    with contextlib.ExitStack() as stack:
        refs = [
            (_file_digest(path), path.stat().st_size, stack.enter_context(path.open("rb")))
            for path in layers
        ]
        _write_layout(out, name, image_config, refs)


def write_directory_layer(root: Path, out: Path) -> None:
    """A layer tar of everything under `root`, owned by root, with fixed times and order.

    The same files give the same bytes, hence the same digest: containerd keeps
    one copy of a layer that did not change between builds.
    """

    def normalized(info: tarfile.TarInfo) -> tarfile.TarInfo:
        info.uid = info.gid = 0
        info.uname = info.gname = "root"
        info.mtime = 0
        return info

    with tarfile.open(out, "w", format=tarfile.PAX_FORMAT) as tar:
        for path in sorted(root.rglob("*")):
            tar.add(path, arcname=str(path.relative_to(root)), recursive=False, filter=normalized)
