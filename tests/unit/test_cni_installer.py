"""`weir cni install|uninstall` on real directories: files, modes, the watcher, the CLI."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from node_agent.cni_install import cli
from node_agent.cni_install.conflist import PluginSettings
from node_agent.cni_install.installer import (
    ConfDirInstaller,
    install_plugin_binary,
    remove_plugin_binary,
)
from weir_common.errors import NodeSetupError

REPO = Path(__file__).resolve().parents[2]
INPUTS = REPO / "tests" / "golden" / "cni" / "input"


def tree(root: Path) -> dict[str, tuple[int, bytes]]:
    """Every entry under root: (mode, content or link target); the byte-identity witness."""
    out = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        st = path.lstat()
        if path.is_symlink():
            out[rel] = (st.st_mode, str(path.readlink()).encode())
        elif path.is_file():
            out[rel] = (st.st_mode, path.read_bytes())
        else:
            out[rel] = (st.st_mode, b"")
    return out


@pytest.fixture
def node(tmp_path):
    """A conf dir, a bin dir holding another plugin, and a stand-in plugin bundle."""
    conf, bins, bundle = tmp_path / "net.d", tmp_path / "bin", tmp_path / "bundle"
    conf.mkdir()
    bins.mkdir()
    (bins / "bridge").write_bytes(b"\x7fELF not really")
    (bins / "bridge").chmod(0o755)
    (bundle / "_internal").mkdir(parents=True)
    (bundle / "weir-cni").write_text("#!/bin/sh\nexit 0\n")
    (bundle / "weir-cni").chmod(0o755)
    (bundle / "_internal" / "lib.so").write_bytes(b"library")
    return conf, bins, bundle


def weir_cni(args: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="weir")
    cli.register(parser.add_subparsers(dest="command", required=True))
    parsed = parser.parse_args(args)
    return int(parsed.func(parsed))


def plugin_types(path: Path) -> list[str]:
    return [p["type"] for p in json.loads(path.read_text())["plugins"]]


@pytest.mark.parametrize("case", ["bridge", "ptp", "calico", "flannel", "cilium", "multus"])
def test_install_then_uninstall_leaves_both_dirs_byte_identical(node, case, capsys):
    conf, bins, bundle = node
    shutil.copytree(INPUTS / case, conf, dirs_exist_ok=True)
    next(conf.glob("*.conf*")).chmod(0o600)  # an unusual mode must survive too
    conf_before, bins_before = tree(conf), tree(bins)
    dirs = ["--conf-dir", str(conf), "--bin-dir", str(bins)]

    assert weir_cni(["cni", "install", *dirs, "--plugin-bundle", str(bundle)]) == 0
    assert weir_cni(["cni", "install", *dirs, "--plugin-bundle", str(bundle)]) == 0
    installed = tree(conf)
    assert installed != conf_before
    assert (bins / "weir-cni").resolve().read_text() == "#!/bin/sh\nexit 0\n"
    assert "weir-cni already in place" in capsys.readouterr().out  # the second run

    assert weir_cni(["cni", "uninstall", *dirs]) == 0
    assert tree(conf) == conf_before
    assert tree(bins) == bins_before


def test_a_converted_conf_keeps_its_mode_and_owner(node):
    conf, _, _ = node
    shutil.copy(INPUTS / "bridge" / "10-containerd-net.conf", conf)
    (conf / "10-containerd-net.conf").chmod(0o640)
    os.chown(conf / "10-containerd-net.conf", 0, 4242)

    ConfDirInstaller(conf, PluginSettings()).install(timeout_s=5)

    assert sorted(p.name for p in conf.iterdir()) == ["10-containerd-net.conflist"]
    st = (conf / "10-containerd-net.conflist").stat()
    assert (st.st_mode & 0o777, st.st_gid) == (0o640, 4242)


def test_waiting_for_the_primary_config_is_bounded_and_says_why(tmp_path):
    installer = ConfDirInstaller(tmp_path / "net.d", PluginSettings())
    started = time.monotonic()
    with pytest.raises(NodeSetupError, match=r"no CNI network config .* after 0.5 s"):
        installer.wait_for_primary(0.5)
    assert time.monotonic() - started < 2


def test_the_primary_config_is_picked_up_as_soon_as_it_appears(tmp_path):
    conf = tmp_path / "net.d"  # not even the directory exists yet
    installer = ConfDirInstaller(conf, PluginSettings())

    def primary_cni_starts() -> None:
        time.sleep(0.3)
        conf.mkdir()
        (conf / "10-flannel.conflist").write_text(
            (INPUTS / "flannel" / "10-flannel.conflist").read_text()
        )

    writer = threading.Thread(target=primary_cni_starts)
    writer.start()
    try:
        assert installer.install(timeout_s=10) is not None
    finally:
        writer.join()
    assert plugin_types(conf / "10-flannel.conflist") == ["flannel", "portmap", "weir-cni"]


def test_the_watcher_puts_our_entry_back_within_a_second(tmp_path):
    conf = tmp_path / "net.d"
    conf.mkdir()
    primary = conf / "10-calico.conflist"
    original = (INPUTS / "calico" / "10-calico.conflist").read_text()
    primary.write_text(original)
    installer = ConfDirInstaller(conf, PluginSettings())
    installer.install(timeout_s=5)
    stop = threading.Event()
    watcher = threading.Thread(target=installer.watch, args=(stop,))
    watcher.start()
    try:
        for attempt in range(3):
            # Rewritten in place, in two writes, as some CNI installers do.
            with primary.open("w") as f:
                f.write(original[:100])
                f.flush()
                time.sleep(0.05)
                f.write(original[100:])
            rewritten = time.monotonic()
            while "weir-cni" not in primary.read_text():
                assert time.monotonic() - rewritten < 1.0, f"not repaired (rewrite {attempt})"
                time.sleep(0.02)
            assert plugin_types(primary)[-1] == "weir-cni"
    finally:
        stop.set()
        watcher.join(timeout=5)
    assert not watcher.is_alive()
    assert plugin_types(primary).count("weir-cni") == 1


def test_the_watcher_survives_its_directory_being_replaced(tmp_path):
    conf = tmp_path / "net.d"
    conf.mkdir()
    text = (INPUTS / "flannel" / "10-flannel.conflist").read_text()
    (conf / "10-flannel.conflist").write_text(text)
    installer = ConfDirInstaller(conf, PluginSettings())
    stop = threading.Event()
    watcher = threading.Thread(target=installer.watch, args=(stop,))
    watcher.start()
    try:
        deadline = time.monotonic() + 5
        while "weir-cni" not in (conf / "10-flannel.conflist").read_text():
            assert time.monotonic() < deadline
            time.sleep(0.02)
        shutil.rmtree(conf)
        time.sleep(0.3)
        conf.mkdir()
        (conf / "10-flannel.conflist").write_text(text)
        deadline = time.monotonic() + 5
        while "weir-cni" not in (conf / "10-flannel.conflist").read_text():
            assert time.monotonic() < deadline, "not repaired after the directory came back"
            time.sleep(0.02)
    finally:
        stop.set()
        watcher.join(timeout=5)


def test_cli_watch_repairs_and_stopping_it_does_not_uninstall(node):
    conf, bins, bundle = node
    primary = conf / "20-ptp.conflist"
    original = (INPUTS / "ptp" / "20-ptp.conflist").read_text()
    primary.write_text(original)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import argparse, sys\n"
            "from node_agent.cni_install import cli\n"
            "p = argparse.ArgumentParser()\n"
            "cli.register(p.add_subparsers())\n"
            "a = p.parse_args(sys.argv[1:])\n"
            "sys.exit(a.func(a))\n",
            *("cni", "install", "--watch", "--conf-dir", str(conf), "--bin-dir", str(bins)),
            *("--plugin-bundle", str(bundle)),
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        lines = [proc.stdout.readline() for _ in range(3)]
        assert lines[2] == f"watching {conf}\n", lines
        primary.write_text(original)
        rewritten = time.monotonic()
        while "weir-cni" not in primary.read_text():
            assert time.monotonic() - rewritten < 1.0, "the watching CLI did not repair"
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=5) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert plugin_types(primary)[-1] == "weir-cni"  # a stop is a restart, not a removal
    assert (bins / "weir-cni").exists()


def test_a_new_build_replaces_the_old_one_and_uninstall_spares_other_plugins(node, tmp_path):
    _, bins, bundle = node
    link = install_plugin_binary(bundle, bins)
    first = link.resolve()
    (bundle / "weir-cni").write_text("#!/bin/sh\nexit 1\n")

    assert install_plugin_binary(bundle, bins) == link
    assert link.resolve() != first
    assert not first.exists()  # the old build is pruned
    assert sorted(p.name for p in (bins / ".weir-cni").iterdir()) == [link.resolve().parent.name]
    assert not str(link.readlink()).startswith("/")  # relative: valid under any mount point

    assert remove_plugin_binary(bins) == [str(link), str(bins / ".weir-cni")]
    assert sorted(p.name for p in bins.iterdir()) == ["bridge"]
    assert remove_plugin_binary(bins) == []


def test_a_bundle_without_the_executable_is_refused(node, tmp_path):
    _, bins, _ = node
    with pytest.raises(NodeSetupError, match="not an executable weir-cni bundle"):
        install_plugin_binary(tmp_path / "nothing", bins)
