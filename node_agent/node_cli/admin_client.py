"""Reading the agent's and the proxy's admin listeners on this node's loopback.

`weir node` runs on the node (or with `ip netns exec` in its netns), so both
listeners are at 127.0.0.1; nothing here goes off the node.
"""

from __future__ import annotations

import http.client
import json
from dataclasses import dataclass
from typing import Any, Final

TIMEOUT_S: Final = 5.0


class AdminUnreachable(Exception):  # noqa: N818 - reads as what happened
    """Nothing answered, or it answered something that is not ours."""


@dataclass(frozen=True)
class Admin:
    """One admin listener: the agent's or the proxy's."""

    name: str  # "agent" or "proxy", for messages
    host: str
    port: int

    def get(self, path: str) -> tuple[int, Any]:
        """Status and decoded JSON body of GET `path`."""
        return self._request("GET", path)

    def section(self, name: str) -> Any:  # noqa: ANN401 - a config_dump section is any JSON
        status, body = self.get(f"/config_dump?section={name}")
        if status != 200 or not isinstance(body, dict) or name not in body:
            raise AdminUnreachable(
                f"the {self.name} at {self.host}:{self.port} has no section {name!r}"
            )
        return body[name]

    def _request(self, method: str, path: str) -> tuple[int, Any]:
        conn = http.client.HTTPConnection(self.host, self.port, timeout=TIMEOUT_S)
        try:
            conn.request(method, path)
            response = conn.getresponse()
            raw = response.read()
        except OSError as e:
            raise AdminUnreachable(
                f"the {self.name} admin at {self.host}:{self.port} does not answer: {e}"
            ) from e
        finally:
            conn.close()
        try:
            return response.status, json.loads(raw)
        except ValueError as e:
            raise AdminUnreachable(
                f"the {self.name} admin at {self.host}:{self.port} answered non-JSON to {path}"
            ) from e
