"""The proxy's side of the agent handoff: enrolled pods become served pods.

The agent hands a pod over before it registers it with the control plane
(so the proxy listens before the pod's first process runs), so the pod's uid
and IPs come from the handoff itself; labels and the mTLS mode, which only
the mesh config knows, come from the proxy's snapshot when it has the pod.
"""

from __future__ import annotations

from dataclasses import replace

from node_agent.netns import Netns
from node_agent.proxy.model import Workload
from node_agent.proxy.proxy import Proxy
from node_agent.proxy_handoff.protocol import EnrolledPod
from weir_common.mesh import resource_name


class AgentPods:
    def __init__(self, proxy: Proxy, node: str) -> None:
        self._proxy = proxy
        self._node = node

    def workload(self, pod: EnrolledPod) -> Workload:
        known = self._proxy.snapshot.workloads.get(resource_name(pod.namespace, pod.name))
        enrolled = Workload(
            uid=pod.uid,
            name=pod.name,
            namespace=pod.namespace,
            service_account=pod.service_account,
            node=self._node,
            ips=pod.ips,
        )
        if known is None:
            return enrolled
        return replace(known, uid=pod.uid, ips=pod.ips, node=self._node, captured=True)

    async def add_pod(self, pod: EnrolledPod, netns: Netns) -> None:
        await self._proxy.add_pod(netns, self.workload(pod))

    async def remove_pod(self, uid: str) -> None:
        await self._proxy.remove_pod(uid)
