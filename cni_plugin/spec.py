"""What the CNI specification fixes: versions, error codes, the error result."""

from __future__ import annotations

import json
from typing import Final

# Versions whose results carry the pod's addresses as `ips[].address` and that
# weir-cni therefore passes through unchanged. 1.0.0 and 1.1.0 are the ones
# weir targets; the 0.3/0.4 ones are what calico and flannel conflists still
# declare, and the runtime hands every plugin the conflist's version.
SUPPORTED_VERSIONS: Final = ("0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0")
LATEST_VERSION: Final = "1.1.0"
# CHECK appeared in 0.4.0; a runtime never sends it for older configs.
CHECK_SINCE: Final = ("0.4.0", "1.0.0", "1.1.0")

# Error codes from the spec's table ("Error codes").
ERR_INCOMPATIBLE_VERSION: Final = 1
ERR_UNSUPPORTED_FIELD: Final = 2
ERR_UNKNOWN_CONTAINER: Final = 3
ERR_INVALID_ENV: Final = 4
ERR_IO: Final = 5
ERR_DECODE: Final = 6
ERR_INVALID_CONFIG: Final = 7
ERR_TRY_AGAIN_LATER: Final = 11
ERR_NOT_AVAILABLE: Final = 50  # 1.1.0, STATUS: do not send ADDs now
# 100 and up are the plugin's own.
ERR_CAPTURE_REFUSED: Final = 100  # the agent will not capture this pod; retrying is pointless
ERR_AGENT_PROTOCOL: Final = 101  # the agent's answer made no sense (version skew?)
ERR_CAPTURE_MISSING: Final = 102  # CHECK: the pod should be captured and is not
ERR_INTERNAL: Final = 999


class CniError(Exception):
    """A failure reported to the runtime as a CNI error result on stdout."""

    def __init__(self, code: int, msg: str, details: str = "") -> None:
        super().__init__(msg)
        self.code = code
        self.msg = msg
        self.details = details

    def to_json(self, cni_version: str) -> str:
        body: dict[str, object] = {"cniVersion": cni_version, "code": self.code, "msg": self.msg}
        if self.details:
            body["details"] = self.details
        return json.dumps(body)
