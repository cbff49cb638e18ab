/* cgroup/connect6: the IPv6 twin of connect4, sending captured connects to
 * [::1]:15001. An IPv4-mapped destination (::ffff:a.b.c.d, a dual-stack
 * socket reaching IPv4) is IPv4 on the wire: it gets the IPv4 exclusions and
 * goes to ::ffff:127.0.0.1, where the proxy's IPv4 listener takes it. */
#include "lib/weir_policy.h"

int weir_connect6(struct bpf_sock_addr *ctx)
{
	if (!weir_is_tcp(ctx))
		return WEIR_CONNECT_CONTINUE;
	__u64 netns_cookie = bpf_get_netns_cookie(ctx);
	if (!weir_pods.lookup(&netns_cookie))
		return WEIR_CONNECT_CONTINUE;

	__u32 ip6[4];
	ip6[0] = WEIR_CTX(ctx->user_ip6[0]);
	ip6[1] = WEIR_CTX(ctx->user_ip6[1]);
	ip6[2] = WEIR_CTX(ctx->user_ip6[2]);
	ip6[3] = WEIR_CTX(ctx->user_ip6[3]);
	int mapped = weir_is_v4_mapped(ip6);

	struct weir_orig_dst dst = {};
	dst.port = bpf_ntohs((__u16)ctx->user_port);
	if (mapped) {
		if (weir_v4_is_local_only(ip6[3]))
			return WEIR_CONNECT_CONTINUE;
		dst.family = 4;
		dst.addr[0] = ip6[3];
	} else {
		if (weir_v6_is_local_only(ip6))
			return WEIR_CONNECT_CONTINUE;
		dst.family = 6;
		weir_copy_ip6(dst.addr, ip6);
	}
	if (weir_outbound_exempt(ctx, netns_cookie, &dst))
		return WEIR_CONNECT_CONTINUE;

	weir_remember_destination(ctx, &dst);
	if (mapped) {
		ctx->user_ip6[0] = 0;
		ctx->user_ip6[1] = 0;
		ctx->user_ip6[2] = bpf_htonl(WEIR_V4_MAPPED_PREFIX);
		ctx->user_ip6[3] = bpf_htonl(WEIR_LOOPBACK_V4);
	} else {
		ctx->user_ip6[0] = 0;
		ctx->user_ip6[1] = 0;
		ctx->user_ip6[2] = 0;
		ctx->user_ip6[3] = bpf_htonl(1);
	}
	ctx->user_port = bpf_htons(WEIR_OUTBOUND_CAPTURE_PORT);
	return WEIR_CONNECT_CONTINUE;
}
