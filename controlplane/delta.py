"""Per-node, per-type delta xDS subscription state (pure, no I/O).

The server keeps one Subscription per (stream, type URL). It records what the
client holds (`known`: name -> version, from ACKs and from the versions a
reconnecting client declares), which names changed since the last push
(`dirty`), the one push in flight (`pending`, at most one per type: changes
coalesce while the client is busy), and what the client refused (`rejected`:
not offered again until the resource changes).
"""

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from controlplane.snapshot import Entry
from controlplane.xds_transport import WILDCARD


@dataclass(frozen=True)
class Delta:
    updated: tuple[Entry, ...]
    removed: tuple[str, ...]


@dataclass(frozen=True)
class PendingPush:
    nonce: str
    versions: Mapping[str, str | None]  # name -> version sent, None for a removal


@dataclass
class Subscription:
    wildcard: bool
    names: set[str] = field(default_factory=set)
    known: dict[str, str] = field(default_factory=dict)
    rejected: dict[str, str | None] = field(default_factory=dict)
    # Names to look at on the next push; None means every name (a full resync).
    dirty: set[str] | None = None
    pending: PendingPush | None = None
    # Until the first push: the client learns it is in sync even if it gets nothing.
    initial: bool = True

    @classmethod
    def open(cls, subscribe: Iterable[str], initial_versions: Mapping[str, str]) -> "Subscription":
        """The state for a type's first request on a stream."""
        names = set(subscribe)
        wildcard = not names or WILDCARD in names
        names.discard(WILDCARD)
        return cls(wildcard=wildcard, names=names, known=dict(initial_versions))

    def wants(self, name: str) -> bool:
        return self.wildcard or name in self.names

    def update_interest(self, subscribe: Iterable[str], unsubscribe: Iterable[str]) -> None:
        for name in subscribe:
            if name == WILDCARD:
                self.wildcard = True
                self.dirty = None
            else:
                self.names.add(name)
                self.mark_dirty((name,))
        for name in unsubscribe:
            if name == WILDCARD:
                self.wildcard = False
                self.dirty = None
            else:
                # The client forgets an unsubscribed resource on its own.
                self.names.discard(name)
                if not self.wildcard:
                    self.known.pop(name, None)
                    self.rejected.pop(name, None)

    def mark_dirty(self, names: Iterable[str]) -> None:
        if self.dirty is not None:
            self.dirty.update(names)

    def next_push(self, view: Mapping[str, Entry], node: str) -> Delta | None:
        """What to send `node` now, or None if nothing (or a push is in flight)."""
        if self.pending is not None or self.dirty == set():
            return None
        candidates = view.keys() | self.known.keys() if self.dirty is None else self.dirty
        self.dirty = set()
        updated: list[Entry] = []
        removed: list[str] = []
        for name in sorted(candidates):
            entry = view.get(name)
            have = self.known.get(name)
            if entry is not None and entry.visible_to(node) and self.wants(name):
                if have != entry.version and self.rejected.get(name, "") != entry.version:
                    updated.append(entry)
            elif have is not None and not (name in self.rejected and self.rejected[name] is None):
                removed.append(name)
        if not updated and not removed and not self.initial:
            return None
        return Delta(tuple(updated), tuple(removed))

    def sent(self, nonce: str, delta: Delta) -> None:
        versions: dict[str, str | None] = {e.name: e.version for e in delta.updated}
        versions.update(dict.fromkeys(delta.removed))
        self.pending = PendingPush(nonce, versions)
        self.initial = False

    def acknowledge(self, nonce: str) -> bool:
        """Apply the push `nonce`; False if it is not the one in flight (stale)."""
        if self.pending is None or self.pending.nonce != nonce:
            return False
        for name, version in self.pending.versions.items():
            self.rejected.pop(name, None)
            if version is None:
                self.known.pop(name, None)
            else:
                self.known[name] = version
        self.pending = None
        return True

    def reject(self, nonce: str) -> bool:
        """The client kept its old config; don't offer the same content again."""
        if self.pending is None or self.pending.nonce != nonce:
            return False
        self.rejected.update(self.pending.versions)
        self.pending = None
        return True
