/* cgroup/connect4: send a captured pod's outbound IPv4 TCP connects to the
 * proxy's outbound listener (127.0.0.1:15001) in the pod's own netns.
 * Attached once at the cgroup v2 root, so it runs for every process on the
 * node: sockets of a netns that is not in weir_pods are left alone. */
#include "lib/weir_policy.h"

int weir_connect4(struct bpf_sock_addr *ctx)
{
	if (!weir_is_tcp(ctx))
		return WEIR_CONNECT_CONTINUE;
	__u64 netns_cookie = bpf_get_netns_cookie(ctx);
	if (!weir_pods.lookup(&netns_cookie))
		return WEIR_CONNECT_CONTINUE;
	if (weir_v4_is_local_only(ctx->user_ip4))
		return WEIR_CONNECT_CONTINUE;

	struct weir_orig_dst dst = {};
	dst.family = 4;
	dst.addr[0] = ctx->user_ip4;
	dst.port = bpf_ntohs((__u16)ctx->user_port);
	if (weir_outbound_exempt(ctx, netns_cookie, &dst))
		return WEIR_CONNECT_CONTINUE;

	weir_remember_destination(ctx, &dst);
	ctx->user_ip4 = bpf_htonl(WEIR_LOOPBACK_V4);
	ctx->user_port = bpf_htons(WEIR_OUTBOUND_CAPTURE_PORT);
	return WEIR_CONNECT_CONTINUE;
}
