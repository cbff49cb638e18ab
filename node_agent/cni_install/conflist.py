"""Putting weir-cni into the runtime's network config and taking it out again (pure).

Everything here works on a snapshot of the conf dir, {file name: text}, and
returns the `Change` to make; `installer.py` reads the directory and applies it.

Which file: the one the runtime uses, the lowest-sorting *.conflist, *.conf or
*.json (libcni's and go-cni's rule; containerd and CRI-O use the first only).
weir-cni goes last in its plugin list, exactly once. A single-plugin .conf is
turned into `<stem>.conflist` the way libcni does it in memory (the .conf
becomes the only plugin), and the .conf is removed, since it would sort first.

What uninstall restores: our entry records the file it was inserted into and
that file's text before we touched it (`RECORD_KEY`). If the file is still
exactly what we wrote, uninstall puts that text back, so install + uninstall
leaves the directory byte-identical. If someone edited it since, uninstall
only drops our entry and keeps their edits (re-serialized).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from cni_plugin.protocol import DEFAULT_AGENT_SOCKET
from cni_plugin.request import (
    DEFAULT_AGENT_NAMESPACE,
    DEFAULT_AGENT_TIMEOUT_S,
    DEFAULT_EXCLUDE_NAMESPACES,
    KEY_AGENT_NAMESPACE,
    KEY_AGENT_SOCKET,
    KEY_AGENT_TIMEOUT,
    KEY_EXCLUDE_NAMESPACES,
)
from cni_plugin.spec import SUPPORTED_VERSIONS
from weir_common.errors import InvalidInputError

# The binary's name in the CNI bin dir, and so the `type` of our conflist entry.
PLUGIN_TYPE: Final = "weir-cni"
RECORD_KEY: Final = "weirInstall"
CONFIG_SUFFIXES: Final = (".conflist", ".conf", ".json")

ConfDir = Mapping[str, str]


@dataclass(frozen=True)
class PluginSettings:
    """What the installer writes into weir-cni's entry (see cni_plugin.request)."""

    agent_socket: str = DEFAULT_AGENT_SOCKET
    exclude_namespaces: tuple[str, ...] = DEFAULT_EXCLUDE_NAMESPACES
    agent_namespace: str = DEFAULT_AGENT_NAMESPACE
    agent_timeout_s: float = DEFAULT_AGENT_TIMEOUT_S

    def entry(self) -> dict[str, Any]:
        return {
            "type": PLUGIN_TYPE,
            KEY_AGENT_SOCKET: self.agent_socket,
            KEY_EXCLUDE_NAMESPACES: list(self.exclude_namespaces),
            KEY_AGENT_NAMESPACE: self.agent_namespace,
            KEY_AGENT_TIMEOUT: self.agent_timeout_s,
        }


@dataclass(frozen=True)
class Change:
    """Files to (over)write atomically, then files to delete, in the conf dir."""

    summary: str
    writes: tuple[tuple[str, str], ...] = ()
    deletes: tuple[str, ...] = ()


def is_config_name(name: str) -> bool:
    return name.endswith(CONFIG_SUFFIXES)


def primary_config(conf_dir: ConfDir) -> str | None:
    """The file the runtime takes its network from, or None if there is none yet."""
    names = sorted(n for n in conf_dir if is_config_name(n))
    return names[0] if names else None


def render(doc: Mapping[str, Any]) -> str:
    return json.dumps(doc, indent=2) + "\n"


def insert(conf_dir: ConfDir, settings: PluginSettings) -> Change | None:
    """Put weir-cni last in the primary config; None if it already is, exactly once."""
    name = primary_config(conf_dir)
    if name is None:
        raise InvalidInputError("no CNI network config to insert weir-cni into")
    text = conf_dir[name]
    doc = _parse(name, text)
    entry = settings.entry()
    if "plugins" in doc:
        ours = _ours(doc)
        if len(ours) == 1 and doc["plugins"][-1] is ours[0] and _settings_of(ours[0]) == entry:
            return None
        target, base = name, _without_ours(name, doc)
    else:
        ours, target, base = [], _conflist_name(name), _from_conf(name, doc)
        existing = conf_dir.get(target)
        if existing is not None and not _ours(_parse(target, existing)):
            raise InvalidInputError(
                f"cannot turn {name} into {target}: {target} exists and is not weir's"
            )
    version = base.get("cniVersion")
    if version not in SUPPORTED_VERSIONS:
        raise InvalidInputError(
            f"{name} declares cniVersion {version!r}; weir-cni speaks "
            f"{', '.join(SUPPORTED_VERSIONS)}, so inserting it would fail every pod"
        )
    record = _record_for(name, text, base, ours)
    new_doc = {**base, "plugins": [*base["plugins"], {**entry, RECORD_KEY: record}]}
    if target == name:
        what = "moved weir-cni to the end of" if ours else "inserted weir-cni into"
        return Change(f"{what} {name}", writes=((name, render(new_doc)),))
    return Change(
        f"turned {name} into {target} with weir-cni last",
        writes=((target, render(new_doc)),),
        deletes=(name,),
    )


def remove(conf_dir: ConfDir) -> Change | None:
    """Take weir-cni out of every config file that has it; None if none does."""
    writes: list[tuple[str, str]] = []
    deletes: list[str] = []
    done: list[str] = []
    for name in sorted(n for n in conf_dir if is_config_name(n)):
        text = conf_dir[name]
        try:
            doc = json.loads(text)
        except (ValueError, RecursionError):
            continue  # not ours to judge: we only ever write valid JSON
        if not isinstance(doc, dict) or not _ours(doc):
            continue
        record = _record(doc)
        if record is not None and _as_we_wrote(record, doc) == text:
            original, orig_text = record
            if original != name:
                deletes.append(name)
            if original == name or original not in conf_dir:
                writes.append((original, orig_text))
                done.append(f"restored {original}")
            else:
                # The primary CNI wrote its file again since; that one is current.
                done.append(f"removed {name} (its {original} was rewritten since)")
        else:
            writes.append((name, render(_without_ours(name, doc))))
            done.append(f"removed weir-cni from {name} (edited since install, kept the edits)")
    if not done:
        return None
    return Change("; ".join(done), writes=tuple(writes), deletes=tuple(deletes))


def _parse(name: str, text: str) -> dict[str, Any]:
    try:
        doc = json.loads(text)
    except (ValueError, RecursionError) as e:
        raise InvalidInputError(f"{name} is not valid JSON ({e}); still being written?") from None
    if not isinstance(doc, dict):
        raise InvalidInputError(f"{name} is not a JSON object")
    if "plugins" in doc and not (
        isinstance(doc["plugins"], list) and all(isinstance(p, dict) for p in doc["plugins"])
    ):
        raise InvalidInputError(f"{name}: 'plugins' is not a list of objects")
    return doc


def _ours(doc: Mapping[str, Any]) -> list[dict[str, Any]]:
    plugins = doc.get("plugins")
    if not isinstance(plugins, list):
        return []
    return [p for p in plugins if isinstance(p, dict) and p.get("type") == PLUGIN_TYPE]


def _without_ours(name: str, doc: Mapping[str, Any]) -> dict[str, Any]:
    plugins = [p for p in doc["plugins"] if p.get("type") != PLUGIN_TYPE]
    if not plugins:
        raise InvalidInputError(f"{name} has no plugin besides weir-cni")
    return {**doc, "plugins": plugins}


def _from_conf(name: str, doc: Mapping[str, Any]) -> dict[str, Any]:
    """A .conf as the conflist libcni makes of it: itself as the only plugin."""
    if not isinstance(doc.get("type"), str):
        raise InvalidInputError(f"{name} has neither 'plugins' nor a plugin 'type'")
    return {"cniVersion": doc.get("cniVersion"), "name": doc.get("name"), "plugins": [dict(doc)]}


def _base_of(name: str, doc: Mapping[str, Any]) -> dict[str, Any]:
    """The conflist the runtime runs for `doc`, without weir-cni."""
    return _without_ours(name, doc) if "plugins" in doc else _from_conf(name, doc)


def _conflist_name(name: str) -> str:
    stem = name.rsplit(".", 1)[0]
    return f"{stem}.conflist"


def _settings_of(entry: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in entry.items() if k != RECORD_KEY}


def _record_for(
    name: str, text: str, base: Mapping[str, Any], ours: list[dict[str, Any]]
) -> dict[str, str]:
    """What uninstall must restore: the text before weir touched it, when still knowable."""
    if not ours:
        return {"file": name, "text": text}
    prior = _record({"plugins": ours})
    if prior is not None:
        prior_name, prior_text = prior
        try:
            prior_base = _base_of(prior_name, _parse(prior_name, prior_text))
        except InvalidInputError:
            prior_base = None
        if prior_base == base:  # only our entry moved or doubled: the old text still holds
            return {"file": prior_name, "text": prior_text}
    # Someone changed the file around our entry; their exact bytes are gone,
    # so uninstall will restore the same content in our formatting.
    return {"file": name, "text": render(base)}


def _record(doc: Mapping[str, Any]) -> tuple[str, str] | None:
    for entry in reversed(_ours(doc)):
        record = entry.get(RECORD_KEY)
        if isinstance(record, dict):
            file, text = record.get("file"), record.get("text")
            if isinstance(file, str) and is_config_name(file) and "/" not in file:
                return (file, text) if isinstance(text, str) else None
    return None


def _as_we_wrote(record: tuple[str, str], doc: Mapping[str, Any]) -> str | None:
    """The text insert() wrote for `record` with doc's own weir-cni entry, if reproducible."""
    name, text = record
    try:
        base = _base_of(name, _parse(name, text))
    except InvalidInputError:
        return None
    return render({**base, "plugins": [*base["plugins"], _ours(doc)[-1]]})
