"""The Unix socket weir-cni talks to: one request per connection, answered by a handler.

Only root may connect: the socket is mode 0600 (it appears at its path with
that mode already, see unix_sockets.bind_private) and each peer's uid is
checked again with SO_PEERCRED. Requests run on their own threads, at most `max_in_flight` at
once; beyond that the plugin is told to retry, which the runtime does.

Stopping closes the listener, removes the socket file (only if it is still
ours) and waits, up to a deadline, for requests in flight.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
import stat
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Final

from cni_plugin.protocol import (
    ProtocolError,
    Reply,
    Request,
    decode_request,
    encode_reply,
    recv_message,
    send_message,
)
from node_agent.cni_events.handler import CniEventHandler
from node_agent.unix_sockets import bind_private, peer_credentials
from weir_common.errors import InvalidInputError, NodeSetupError, WeirError

log = logging.getLogger(__name__)
plugin_log = logging.getLogger("weir.cni_plugin")

# sun_path holds 108 bytes including the terminating NUL.
_MAX_SOCKET_PATH: Final = 107
# How often the accept loop looks at the stop flag; bounds how long stop() waits for it.
_ACCEPT_POLL_S: Final = 0.2
_ACCEPT_TRANSIENT: Final = frozenset(
    {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM, errno.ECONNABORTED}
)


class CniEventServer:
    """Serves weir-cni's requests on `socket_path` until `stop()` (or leaving `with`)."""

    def __init__(
        self,
        socket_path: str | Path,
        handler: CniEventHandler,
        *,
        max_in_flight: int = 32,
        io_timeout_s: float = 5.0,
        allowed_uids: frozenset[int] = frozenset({0}),
        on_failure: Callable[[str], None] | None = None,
    ) -> None:
        self.socket_path = Path(socket_path)
        if len(os.fsencode(self.socket_path)) > _MAX_SOCKET_PATH:
            raise InvalidInputError(
                f"socket path {self.socket_path} is longer than {_MAX_SOCKET_PATH} bytes"
            )
        self._handler = handler
        self._slots = threading.BoundedSemaphore(max_in_flight)
        self._io_timeout_s = io_timeout_s
        self._allowed_uids = allowed_uids
        # Told (on the accept thread) when the socket stops serving without stop().
        self._on_failure = on_failure
        self._stopping = threading.Event()
        self._listener: socket.socket | None = None
        self._socket_inode = 0
        self._acceptor: threading.Thread | None = None
        self._workers: set[threading.Thread] = set()
        self._workers_lock = threading.Lock()

    def __enter__(self) -> CniEventServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self) -> None:
        """Bind the socket and start accepting; NodeSetupError if another agent serves it."""
        if self._listener is not None:
            raise InvalidInputError(f"CNI event server on {self.socket_path} already started")
        listener = self._bind()
        self._listener = listener
        self._socket_inode = self.socket_path.stat().st_ino
        self._acceptor = threading.Thread(
            target=self._accept_loop, args=(listener,), name="cni-events-accept", daemon=True
        )
        self._acceptor.start()
        log.info("serving CNI plugin requests on %s", self.socket_path)

    def stop(self, drain_timeout_s: float = 5.0) -> None:
        """Stop accepting, remove the socket, wait up to `drain_timeout_s` for requests."""
        if self._listener is None or self._stopping.is_set():
            return
        self._stopping.set()
        if self._acceptor is not None:
            self._acceptor.join(timeout=_ACCEPT_POLL_S * 5)
        self._listener.close()
        with contextlib.suppress(FileNotFoundError):
            # A successor agent may already own the path: only remove our own socket.
            if self.socket_path.stat().st_ino == self._socket_inode:
                self.socket_path.unlink()
        deadline = time.monotonic() + drain_timeout_s
        with self._workers_lock:
            workers = list(self._workers)
        for worker in workers:
            worker.join(timeout=max(0.0, deadline - time.monotonic()))
        stuck = [w.name for w in workers if w.is_alive()]
        if stuck:
            log.warning("stopped with %d CNI requests still running: %s", len(stuck), stuck)

    # -- socket ----------------------------------------------------------

    def _bind(self) -> socket.socket:
        path = self.socket_path
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        _clear_stale_socket(path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.settimeout(_ACCEPT_POLL_S)
            bind_private(sock, path, 0o600)
        except BaseException:
            sock.close()
            raise
        return sock

    def _accept_loop(self, listener: socket.socket) -> None:
        try:
            self._accept_until_stopped(listener)
        except Exception as e:
            if not self._stopping.is_set():
                log.exception("CNI event socket %s stopped serving", self.socket_path)
                if self._on_failure is not None:
                    self._on_failure(repr(e))

    def _accept_until_stopped(self, listener: socket.socket) -> None:
        while not self._stopping.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError as e:
                if self._stopping.is_set():
                    return
                if e.errno not in _ACCEPT_TRANSIENT:
                    raise
                # Out of descriptors or memory: this client is lost, the socket stays.
                log.warning("accepting on CNI event socket %s failed: %s", self.socket_path, e)
                time.sleep(_ACCEPT_POLL_S)
                continue
            if not self._slots.acquire(blocking=False):
                # Answered inline: a full server must not make the plugin wait for a slot.
                self._answer(conn, Reply.failure("node agent is busy", retryable=True))
                continue
            worker = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            with self._workers_lock:
                self._workers.add(worker)
            worker.start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            _pid, uid, _gid = peer_credentials(conn)
            if uid not in self._allowed_uids:
                log.warning("refused a CNI request from uid %d", uid)
                self._answer(conn, Reply.failure(f"uid {uid} may not ask", retryable=False))
                return
            try:
                payload = recv_message(conn, time.monotonic() + self._io_timeout_s)
                request = decode_request(payload)
            except ProtocolError as e:
                log.warning("malformed CNI request: %s", e)
                self._answer(conn, Reply.failure(f"malformed request: {e}", retryable=False))
                return
            except OSError as e:
                log.warning("CNI request not received: %s", e)
                conn.close()
                return
            except Exception as e:
                # A decoder bug must still get the plugin an answer, not a timeout.
                log.exception("decoding a CNI request crashed")
                self._answer(
                    conn, Reply.failure(f"node agent internal error: {e!r}", retryable=False)
                )
                return
            self._answer(conn, self._dispatch(request))
        finally:
            self._slots.release()
            with self._workers_lock:
                self._workers.discard(threading.current_thread())

    def _answer(self, conn: socket.socket, reply: Reply) -> None:
        with conn:
            try:
                send_message(conn, encode_reply(reply), time.monotonic() + self._io_timeout_s)
            except OSError as e:  # the plugin gave up (timed out); it reports that itself
                log.warning("could not answer the CNI plugin: %s", e)

    def _dispatch(self, request: Request) -> Reply:
        pod = request.pod
        who = pod.describe() if pod is not None else request.op
        for line in request.plugin_log:
            plugin_log.info("%s: %s", who, line)
        try:
            if request.op == "add" and pod is not None:
                decision = self._handler.on_add(pod)
                return Reply.success(captured=decision.captured, reason=decision.reason)
            if request.op == "del" and pod is not None:
                self._handler.on_del(pod)
            elif request.op == "check" and pod is not None:
                self._handler.on_check(pod)
            elif request.op == "gc":
                self._handler.on_gc(frozenset(request.attachments))
            # "status": answering at all is the answer; the agent serves only when ready.
            return Reply.success()
        except WeirError as e:
            log.warning("CNI %s for %s failed: %s", request.op.upper(), who, e.message)
            return Reply.failure(e.message, retryable=e.retryable)
        except Exception as e:
            log.exception("CNI %s for %s crashed the handler", request.op.upper(), who)
            return Reply.failure(f"node agent internal error: {e!r}", retryable=False)


def _clear_stale_socket(path: Path) -> None:
    """Remove a socket left by a dead agent; refuse to take over a live one or a non-socket."""
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise NodeSetupError(f"{path} exists and is not a socket; refusing to replace it")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(str(path))
        except (ConnectionRefusedError, FileNotFoundError):
            path.unlink(missing_ok=True)
            return
        except OSError as e:
            raise NodeSetupError(f"cannot tell whether {path} is in use: {e.strerror}") from None
    raise NodeSetupError(f"another process already serves CNI requests on {path}")
