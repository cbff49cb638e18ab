"""Registration of enrolled pods with the control plane (local mode).

Registering is the last step of an ADD, after the proxy acknowledged the pod,
which it does only once it holds a certificate for the pod's identity. So a
pod that reaches this step can already be served; a control plane that cannot
be reached right now must not fail its ADD. Its registration is kept as unsent
by the client, which sends it as soon as the control plane answers again (see
node_agent/controlplane_client.py), and the pod's record on disk carries it
over an agent restart. A refusal is another matter: the control plane said no
to this pod, and the ADD fails.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import grpc

from node_agent.controlplane_client import ControlPlaneClient, WorkloadRegistration
from node_agent.enrollment.registry import PodRecord
from weir_common.errors import InvalidInputError, TransientError, WeirError

log = logging.getLogger(__name__)

# Codes where the same call can succeed later; anything else is a refusal.
_TRANSIENT = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.CANCELLED,
    }
)


def _translate(what: str, error: grpc.aio.AioRpcError) -> WeirError:
    message = f"control plane {what}: {error.code().name}: {error.details()}"
    if error.code() in _TRANSIENT:
        return TransientError(message)
    return InvalidInputError(message)


class ControlPlaneRegistrar:
    def __init__(self, client: ControlPlaneClient) -> None:
        self._client = client

    def remember(self, records: Iterable[PodRecord]) -> None:
        """Pods enrolled by an earlier agent process: registered again on the next stream."""
        self._client.remember(_registration(record) for record in records)

    async def register(self, record: PodRecord) -> None:
        """Register the pod now, or queue it while the control plane cannot be reached.

        Raises InvalidInputError only when the control plane refused the pod.
        """
        registration = _registration(record)
        try:
            await self._client.register_workload(
                namespace=registration.namespace,
                name=registration.name,
                uid=registration.uid,
                ips=registration.ips,
            )
        except grpc.aio.AioRpcError as e:
            error = _translate(f"refused to register {record.key()}", e)
            if not error.retryable:
                raise error from None
            self._queued(record, error.message)
        except TransientError as e:
            self._queued(record, e.message)

    async def deregister(self, record: PodRecord) -> None:
        try:
            await self._client.deregister_workload(
                namespace=record.namespace, name=record.name, uid=record.uid
            )
        except grpc.aio.AioRpcError as e:
            raise _translate(f"refused to deregister {record.key()}", e) from None

    @staticmethod
    def _queued(record: PodRecord, why: str) -> None:
        log.warning(
            "registration of %s queued until the control plane answers (%s)", record.key(), why
        )


def _registration(record: PodRecord) -> WorkloadRegistration:
    return WorkloadRegistration(
        namespace=record.namespace,
        name=record.name,
        uid=record.uid,
        ips=tuple(ip.split("/")[0] for ip in record.ips),
    )
