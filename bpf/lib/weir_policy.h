/* Decisions shared by the attach points: is this pod captured, is this
 * destination or socket exempt. Each helper answers one question. */
#ifndef WEIR_POLICY_H
#define WEIR_POLICY_H

#include "lib/weir_maps.h"

/* Context fields must be accessed one at a time at their own offset, with
 * their own size. volatile keeps clang from merging two reads into a load
 * through a computed pointer, or two adjacent writes into one wider store;
 * the verifier rejects both. */
#define WEIR_CTX(field) (*(volatile __typeof__(field) *)&(field))

#define WEIR_V4_MAPPED_PREFIX 0x0000ffff /* ::ffff:0:0/96, third word, host order */

static __always_inline void weir_mapped_v4(__u32 out[4], __u32 ip4)
{
	out[0] = 0;
	out[1] = 0;
	out[2] = bpf_htonl(WEIR_V4_MAPPED_PREFIX);
	out[3] = ip4;
}

static __always_inline void weir_copy_ip6(__u32 out[4], const __u32 in[4])
{
	out[0] = in[0];
	out[1] = in[1];
	out[2] = in[2];
	out[3] = in[3];
}

static __always_inline int weir_is_v4_mapped(const __u32 ip6[4])
{
	return ip6[0] == 0 && ip6[1] == 0 && ip6[2] == bpf_htonl(WEIR_V4_MAPPED_PREFIX);
}

/* 127.0.0.0/8 and 0.0.0.0 (which Linux connects to as loopback). */
static __always_inline int weir_v4_is_local_only(__u32 ip4)
{
	return (bpf_ntohl(ip4) >> 24) == 127 || ip4 == 0;
}

/* ::1 and :: (which Linux connects to as ::1). */
static __always_inline int weir_v6_is_local_only(const __u32 ip6[4])
{
	return ip6[0] == 0 && ip6[1] == 0 && ip6[2] == 0 &&
	       (ip6[3] == 0 || ip6[3] == bpf_htonl(1));
}

/* The source the node SNATs its own connections to pods to (kubelet probes,
 * node_agent/redirect/host_probes.py). Only the node can complete a
 * handshake from it: replies to it are routed to the node, which de-NATs
 * only the connections it SNATed itself. */
static __always_inline int weir_is_probe_source(const struct weir_addr *a)
{
	if (a->family == 4)
		return bpf_ntohl(a->addr[0]) == WEIR_PROBE_SOURCE_V4;
	return bpf_ntohl(a->addr[0]) == WEIR_PROBE_SOURCE_V6_0 &&
	       bpf_ntohl(a->addr[1]) == WEIR_PROBE_SOURCE_V6_1 &&
	       bpf_ntohl(a->addr[2]) == WEIR_PROBE_SOURCE_V6_2 &&
	       bpf_ntohl(a->addr[3]) == WEIR_PROBE_SOURCE_V6_3;
}

/* The proxy's own connections: by UID or GID of the caller, or by the mark
 * on the socket (only our bits of it: other tools own the rest). */
static __always_inline int weir_is_proxy(struct bpf_sock_addr *ctx)
{
	__u64 uid_gid = bpf_get_current_uid_gid();

	if ((__u32)uid_gid == WEIR_PROXY_UID || (__u32)(uid_gid >> 32) == WEIR_PROXY_GID)
		return 1;
	struct bpf_sock *sk = ctx->sk;
	if (sk && (sk->mark & WEIR_PROXY_MARK_MASK) == WEIR_PROXY_MARK)
		return 1;
	return 0;
}

static __always_inline int weir_port_verdict(__u64 netns_cookie, __u16 port, __u8 direction)
{
	struct weir_port_key key = {};

	key.netns_cookie = netns_cookie;
	key.port = port;
	key.direction = direction;
	__u8 *verdict = weir_ports.lookup(&key);
	return verdict ? *verdict : 0;
}

/* Excluded CIDRs and the pod's own addresses. */
static __always_inline int weir_destination_excluded(__u64 netns_cookie,
						     const struct weir_orig_dst *dst)
{
	struct weir_cidr_key key = {};

	key.prefixlen = WEIR_CIDR_KEY_FIXED_BITS + (dst->family == 4 ? 32 : 128);
	key.netns_cookie_lo = (__u32)netns_cookie;
	key.netns_cookie_hi = (__u32)(netns_cookie >> 32);
	key.family = dst->family;
	weir_copy_ip6(key.addr, dst->addr);
	return weir_cidrs.lookup(&key) != NULL;
}

/* Everything an outbound connect must pass to be captured, in the order the
 * iptables backend applies it. Returns 1 when the connect goes out as is. */
static __always_inline int weir_outbound_exempt(struct bpf_sock_addr *ctx, __u64 netns_cookie,
						const struct weir_orig_dst *dst)
{
	if (weir_is_proxy(ctx))
		return 1;
	if (weir_port_verdict(netns_cookie, dst->port, WEIR_DIR_OUTBOUND) == WEIR_PORT_EXCLUDE)
		return 1;
	return weir_destination_excluded(netns_cookie, dst);
}

/* Keep the original destination under the socket's cookie; sockops moves it
 * to the connection key once the source port is known. */
static __always_inline void weir_remember_destination(struct bpf_sock_addr *ctx,
						      struct weir_orig_dst *dst)
{
	__u64 cookie = bpf_get_socket_cookie(ctx);

	weir_sock_dst.update(&cookie, dst);
}

static __always_inline int weir_is_tcp(struct bpf_sock_addr *ctx)
{
	return ctx->type == SOCK_STREAM && ctx->protocol == IPPROTO_TCP;
}

#endif
