"""The plugin's side of the agent socket: one request, one reply, one deadline."""

from __future__ import annotations

import contextlib
import socket
import time

from cni_plugin.protocol import (
    Reply,
    Request,
    decode_reply,
    encode_request,
    recv_message,
    send_message,
)


class AgentUnreachableError(Exception):
    """No answer from the agent: not listening, not permitted, or too slow."""


def ask_agent(socket_path: str, request: Request, timeout_s: float) -> Reply:
    """Send `request` and return the agent's reply, all within `timeout_s`.

    Raises AgentUnreachableError when there is no answer, and
    protocol.ProtocolError when the answer is not a valid reply.
    """
    deadline = time.monotonic() + timeout_s
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as sock:
        try:
            sock.settimeout(timeout_s)
            sock.connect(socket_path)
            # The agent answers some requests without reading them (busy, a
            # refused uid) and closes: that answer is still here to read.
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                send_message(sock, encode_request(request), deadline)
            return decode_reply(recv_message(sock, deadline))
        except TimeoutError:
            raise AgentUnreachableError(f"no answer within {timeout_s:g} s") from None
        except FileNotFoundError:
            raise AgentUnreachableError("socket does not exist (agent not running?)") from None
        except ConnectionRefusedError:
            raise AgentUnreachableError("connection refused (agent not running?)") from None
        except OSError as e:
            raise AgentUnreachableError(e.strerror or str(e)) from None
