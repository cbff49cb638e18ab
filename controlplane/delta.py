"""Per-node, per-type delta xDS subscription state (pure, no I/O).

The server keeps one Subscription per (stream, type URL). It records what the
client holds, which names changed since the last push (`dirty`), the one push
in flight (`pending`, at most one per type: changes coalesce while the client
is busy), and what the client refused (`rejected`: not offered again until the
resource changes).

What the client holds is not a per-node copy of every name and version: with
10,000 workloads and 1,000 nodes that alone was most of the control plane's
memory. A wildcard subscription that is in sync points at the snapshot view it
synced to (`base`, one immutable mapping shared by every such subscription),
read through the node's visibility; `overlay` records only where the client
differs from it (newer or older versions, names it does not hold). Whenever the
client is in sync again (nothing dirty, nothing in flight) the subscription
moves its base to the current view and the overlay shrinks back to the names
the client rejected. Explicit (non-wildcard) subscriptions name few resources
and keep everything in the overlay.

A push is cut to a byte budget (`next_push(view, max_bytes)`): what does not
fit stays dirty and goes in the next push, after the client answered this one,
so an initial sync of a large mesh arrives as several bounded messages instead
of one that outgrows gRPC's message limit. `partial` says a cut push has more
to come.
"""

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Final

from controlplane.snapshot import Entry
from weir_common.xds_transport import WILDCARD

NO_ENTRIES: Final[Mapping[str, Entry]] = MappingProxyType({})
# A removed name in a response costs its bytes plus a field tag and length.
_REMOVED_NAME_OVERHEAD: Final = 3


@dataclass(frozen=True)
class Delta:
    updated: tuple[Entry, ...]
    removed: tuple[str, ...]
    # Set when the delta was computed over every name of this view for a
    # wildcard subscription: once ACKed, the client holds exactly the view.
    complete_view: Mapping[str, Entry] | None = None


@dataclass(frozen=True)
class PendingPush:
    nonce: str
    delta: Delta


@dataclass
class Subscription:
    node: str
    wildcard: bool
    names: set[str] = field(default_factory=set)
    base: Mapping[str, Entry] = field(default_factory=lambda: NO_ENTRIES)
    # name -> version the client holds instead of base's; None: holds nothing.
    overlay: dict[str, str | None] = field(default_factory=dict)
    rejected: dict[str, str | None] = field(default_factory=dict)
    # Names to look at on the next push; None means every name (a full resync).
    dirty: set[str] | None = None
    pending: PendingPush | None = None
    # Until the first push: the client learns it is in sync even if it gets nothing.
    initial: bool = True
    # The last push was cut to its byte budget: the rest is dirty, still to send.
    partial: bool = False

    @classmethod
    def open(
        cls, node: str, subscribe: Iterable[str], initial_versions: Mapping[str, str]
    ) -> "Subscription":
        """The state for a type's first request on a stream."""
        names = set(subscribe)
        wildcard = not names or WILDCARD in names
        names.discard(WILDCARD)
        return cls(node=node, wildcard=wildcard, names=names, overlay=dict(initial_versions))

    def wants(self, name: str) -> bool:
        return self.wildcard or name in self.names

    def held(self, name: str) -> str | None:
        """The version of `name` the client holds, None if it holds none."""
        if name in self.overlay:
            return self.overlay[name]
        entry = self.base.get(name)
        if entry is not None and entry.visible_to(self.node):
            return entry.version
        return None

    def held_versions(self) -> dict[str, str]:
        """Everything the client holds, materialized (for tests and debugging)."""
        held = {name: self.held(name) for name in self.base.keys() | self.overlay.keys()}
        return {name: version for name, version in held.items() if version is not None}

    def update_interest(self, subscribe: Iterable[str], unsubscribe: Iterable[str]) -> None:
        for name in subscribe:
            if name == WILDCARD:
                self._set_wildcard(True)
            else:
                self.names.add(name)
                self.mark_dirty((name,))
        for name in unsubscribe:
            if name == WILDCARD:
                self._set_wildcard(False)
            else:
                # The client forgets an unsubscribed resource on its own.
                self.names.discard(name)
                if not self.wildcard:
                    self.overlay.pop(name, None)
                    self.rejected.pop(name, None)

    def mark_dirty(self, names: Iterable[str]) -> None:
        if self.dirty is not None:
            self.dirty.update(names)

    def next_push(self, view: Mapping[str, Entry], max_bytes: int | None = None) -> Delta | None:
        """What to send now, or None if nothing (or a push is in flight).

        With `max_bytes`, the push holds only the changes that fit (at least
        one); the others stay dirty for the next push.
        """
        if self.pending is not None:
            return None
        if self.dirty == set():
            self._rebase(view)
            return None
        complete = self.dirty is None and self.wildcard
        if self.dirty is None:
            candidates = view.keys() | self.base.keys() | self.overlay.keys()
        else:
            candidates = self.dirty
        self.dirty = set()
        updated: list[Entry] = []
        removed: list[str] = []
        for name in sorted(candidates):
            entry = view.get(name)
            have = self.held(name)
            if entry is not None and entry.visible_to(self.node) and self.wants(name):
                if have != entry.version and self.rejected.get(name, "") != entry.version:
                    updated.append(entry)
            elif have is not None and not (name in self.rejected and self.rejected[name] is None):
                removed.append(name)
        if not updated and not removed and not self.initial:
            self.partial = False
            self._rebase(view)
            return None
        later: list[str] = []
        if max_bytes is not None:
            updated, removed, later = _cut(updated, removed, max_bytes)
        self.partial = bool(later)
        if later:
            # Looked at again, against the view of the time, on the next push.
            self.dirty.update(later)
            return Delta(tuple(updated), tuple(removed))
        return Delta(tuple(updated), tuple(removed), view if complete else None)

    def sent(self, nonce: str, delta: Delta) -> None:
        self.pending = PendingPush(nonce, delta)
        self.initial = False

    def acknowledge(self, nonce: str) -> bool:
        """Apply the push `nonce`; False if it is not the one in flight (stale)."""
        if self.pending is None or self.pending.nonce != nonce:
            return False
        delta = self.pending.delta
        self.pending = None
        for entry in delta.updated:
            self.rejected.pop(entry.name, None)
        for name in delta.removed:
            self.rejected.pop(name, None)
        if delta.complete_view is not None:
            # No per-name copy even for the initial sync of 10,000 resources.
            self._move_base(delta.complete_view)
            return True
        for entry in delta.updated:
            self.overlay[entry.name] = entry.version
        self.overlay.update(dict.fromkeys(delta.removed))
        return True

    def reject(self, nonce: str) -> bool:
        """The client kept its old config; don't offer the same content again."""
        if self.pending is None or self.pending.nonce != nonce:
            return False
        delta = self.pending.delta
        self.rejected.update({entry.name: entry.version for entry in delta.updated})
        self.rejected.update(dict.fromkeys(delta.removed))
        self.pending = None
        return True

    def _rebase(self, view: Mapping[str, Entry]) -> None:
        """The client is in sync with `view` (except what it rejected): share it."""
        if self.wildcard and (self.overlay or self.base is not view):
            self._move_base(view)

    def _move_base(self, view: Mapping[str, Entry]) -> None:
        # Rejected names are where the client kept something other than `view`.
        self.overlay = {name: self.held(name) for name in self.rejected}
        self.base = view

    def _set_wildcard(self, wildcard: bool) -> None:
        if wildcard == self.wildcard:
            return
        # Only wildcard subscriptions have a base (their interest is "all", so
        # base reads the same whatever names come and go): spell out what the
        # client holds before the interest changes under it.
        self.overlay = {name: self.held(name) for name in self.base.keys() | self.overlay.keys()}
        self.base = NO_ENTRIES
        self.wildcard = wildcard
        self.dirty = None
        if self.pending is not None:
            # The push in flight was computed for the old interest: apply it name by name.
            self.pending = replace(
                self.pending, delta=replace(self.pending.delta, complete_view=None)
            )


def _cut(
    updated: list[Entry], removed: list[str], max_bytes: int
) -> tuple[list[Entry], list[str], list[str]]:
    """The changes that fit in `max_bytes` (at least one), and the names of the rest."""
    costs: list[tuple[int, str, Entry | None]]
    costs = [(len(name) + _REMOVED_NAME_OVERHEAD, name, None) for name in removed]
    costs += [(len(entry.fragment), entry.name, entry) for entry in updated]
    size = 0
    kept_updated: list[Entry] = []
    kept_removed: list[str] = []
    for i, (cost, name, entry) in enumerate(costs):
        if i > 0 and size + cost > max_bytes:
            return kept_updated, kept_removed, [n for _, n, _ in costs[i:]]
        size += cost
        if entry is None:
            kept_removed.append(name)
        else:
            kept_updated.append(entry)
    return kept_updated, kept_removed, []
