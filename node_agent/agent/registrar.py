"""Registration of enrolled pods with the control plane (local mode)."""

from __future__ import annotations

from collections.abc import Iterable

import grpc

from node_agent.controlplane_client import ControlPlaneClient, WorkloadRegistration
from node_agent.enrollment.registry import PodRecord
from weir_common.errors import InvalidInputError, TransientError, WeirError

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
        registration = _registration(record)
        try:
            await self._client.register_workload(
                namespace=registration.namespace,
                name=registration.name,
                uid=registration.uid,
                ips=registration.ips,
            )
        except grpc.aio.AioRpcError as e:
            raise _translate(f"refused to register {record.key()}", e) from None

    async def deregister(self, record: PodRecord) -> None:
        try:
            await self._client.deregister_workload(
                namespace=record.namespace, name=record.name, uid=record.uid
            )
        except grpc.aio.AioRpcError as e:
            raise _translate(f"refused to deregister {record.key()}", e) from None


def _registration(record: PodRecord) -> WorkloadRegistration:
    return WorkloadRegistration(
        namespace=record.namespace,
        name=record.name,
        uid=record.uid,
        ips=tuple(ip.split("/")[0] for ip in record.ips),
    )
