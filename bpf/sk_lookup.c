/* sk_lookup: inbound capture without iptables. Attached to each captured
 * pod's netns (one BPF link per netns), it runs when a TCP SYN arrives and
 * no established socket matches, and hands the connection to the proxy's
 * 15006 listener. The accepted socket keeps the address the peer dialled
 * (getsockname is the original destination, nothing is rewritten); it is
 * also filed for the getsockopt program so SO_ORIGINAL_DST answers as under
 * iptables.
 *
 * Connections from the kubelet probe source are never captured.
 *
 * sk_lookup may not read the netns cookie, so the pod is found by the local
 * address the connection arrives at (weir_pod_addrs, filled at apply). */
#include "lib/weir_policy.h"

static __always_inline int weir_inbound_captured(__u64 netns_cookie, const struct weir_pod *pod,
						 __u16 port)
{
	if (port == WEIR_INBOUND_TUNNEL_PORT)
		return 0;
	int verdict = weir_port_verdict(netns_cookie, port, WEIR_DIR_INBOUND);
	if (pod->flags & WEIR_POD_INBOUND_INCLUDED_ONLY)
		return verdict == WEIR_PORT_INCLUDE;
	return verdict != WEIR_PORT_EXCLUDE;
}

int weir_sk_lookup(struct bpf_sk_lookup *ctx)
{
	if (ctx->protocol != IPPROTO_TCP)
		return SK_PASS;
	/* From the pod itself over loopback: never inbound, as under iptables,
	 * whose nat PREROUTING does not see locally originated connections. */
	if (ctx->ingress_ifindex == WEIR_LOOPBACK_IFINDEX)
		return SK_PASS;

	/* Read every field unconditionally, each at its fixed offset (see sockops). */
	__u32 local4 = WEIR_CTX(ctx->local_ip4), remote4 = WEIR_CTX(ctx->remote_ip4);
	__u32 local6[4], remote6[4];
	local6[0] = WEIR_CTX(ctx->local_ip6[0]);
	local6[1] = WEIR_CTX(ctx->local_ip6[1]);
	local6[2] = WEIR_CTX(ctx->local_ip6[2]);
	local6[3] = WEIR_CTX(ctx->local_ip6[3]);
	remote6[0] = WEIR_CTX(ctx->remote_ip6[0]);
	remote6[1] = WEIR_CTX(ctx->remote_ip6[1]);
	remote6[2] = WEIR_CTX(ctx->remote_ip6[2]);
	remote6[3] = WEIR_CTX(ctx->remote_ip6[3]);

	struct weir_addr local = {}, remote = {};
	struct weir_conn_key conn = {};
	if (ctx->family == AF_INET) {
		local.family = 4;
		local.addr[0] = local4;
		remote.family = 4;
		remote.addr[0] = remote4;
		weir_mapped_v4(conn.local_ip, local4);
		weir_mapped_v4(conn.peer_ip, remote4);
	} else {
		local.family = 6;
		weir_copy_ip6(local.addr, local6);
		remote.family = 6;
		weir_copy_ip6(remote.addr, remote6);
		weir_copy_ip6(conn.local_ip, local6);
		weir_copy_ip6(conn.peer_ip, remote6);
	}
	/* Kubelet probes reach the app as iptables' WEIR-INBOUND lets them. */
	if (weir_is_probe_source(&remote))
		return SK_PASS;
	__u64 *cookie = weir_pod_addrs.lookup(&local);
	if (!cookie)
		return SK_PASS;
	__u64 netns_cookie = *cookie;
	/* The pod dialling its own address: local too, though it arrives with
	 * the address's interface as ingress rather than lo. */
	__u64 *from = weir_pod_addrs.lookup(&remote);
	if (from && *from == netns_cookie)
		return SK_PASS;
	struct weir_pod *pod = weir_pods.lookup(&netns_cookie);
	if (!pod)
		return SK_PASS;
	__u16 port = (__u16)ctx->local_port;
	if (!weir_inbound_captured(netns_cookie, pod, port))
		return SK_PASS;

	struct weir_listener_key lk = {};
	lk.netns_cookie = netns_cookie;
	lk.family = ctx->family;
	struct bpf_sock *sk = (struct bpf_sock *)weir_listeners.lookup(&lk);
	if (!sk && ctx->family == AF_INET) {
		/* A dual-stack IPv6 listener also takes IPv4. */
		lk.family = AF_INET6;
		sk = (struct bpf_sock *)weir_listeners.lookup(&lk);
	}
	/* Captured, but the proxy does not listen: refuse, as iptables'
	 * REDIRECT to a closed 15006 does, rather than let it reach the app. */
	if (!sk)
		return SK_DROP;
	long err = bpf_sk_assign(ctx, sk, 0);
	bpf_sk_release(sk);
	if (err)
		return SK_DROP;

	struct weir_orig_dst dst = {};
	dst.family = local.family;
	weir_copy_ip6(dst.addr, local.addr);
	dst.port = port;
	conn.netns_cookie = netns_cookie;
	conn.local_port = port;
	conn.peer_port = bpf_ntohs(ctx->remote_port);
	weir_orig_dst.update(&conn, &dst);
	return SK_PASS;
}
