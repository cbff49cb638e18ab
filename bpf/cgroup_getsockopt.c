/* cgroup/getsockopt: answer SO_ORIGINAL_DST (SOL_IP) and IP6T_SO_ORIGINAL_DST
 * (SOL_IPV6) for connections Weir's eBPF mode steered, exactly as conntrack
 * answers them for the iptables mode, so the proxy has one code path.
 *
 * This runs after the kernel's own getsockopt for every process on the node.
 * Anything else (other options, sockets we did not steer, and a call the
 * kernel already answered, e.g. under iptables capture) passes through
 * untouched: retval and the caller's buffer stay what the kernel made them. */
#include "lib/weir_policy.h"

struct weir_sockaddr_in {
	__u16 family;
	__be16 port;
	__be32 addr;
	__u8 zero[8];
};

struct weir_sockaddr_in6 {
	__u16 family;
	__be16 port;
	__u32 flowinfo;
	__u32 addr[4];
	__u32 scope_id;
};

static __always_inline int weir_pass(struct bpf_sockopt *ctx)
{
	/* Beyond one page the kernel did not give us the caller's buffer;
	 * optlen 0 tells it to keep the original result (older kernels would
	 * otherwise fail the call with EFAULT). */
	if (ctx->optlen > WEIR_PAGE_SIZE)
		WEIR_CTX(ctx->optlen) = 0;
	return WEIR_SOCKOPT_CONTINUE;
}

static __always_inline int weir_answer_v4(struct bpf_sockopt *ctx, const struct weir_orig_dst *dst)
{
	struct weir_sockaddr_in *sin = ctx->optval;

	if (dst->family != 4 || (void *)(sin + 1) > ctx->optval_end)
		return weir_pass(ctx);
	sin->family = AF_INET;
	sin->port = bpf_htons(dst->port);
	sin->addr = dst->addr[0];
	__builtin_memset(sin->zero, 0, sizeof(sin->zero));
	WEIR_CTX(ctx->optlen) = sizeof(*sin);
	WEIR_CTX(ctx->retval) = 0;
	return WEIR_SOCKOPT_CONTINUE;
}

static __always_inline int weir_answer_v6(struct bpf_sockopt *ctx, const struct weir_orig_dst *dst)
{
	struct weir_sockaddr_in6 *sin6 = ctx->optval;

	if ((void *)(sin6 + 1) > ctx->optval_end)
		return weir_pass(ctx);
	sin6->family = AF_INET6;
	sin6->port = bpf_htons(dst->port);
	sin6->flowinfo = 0;
	if (dst->family == 4) {
		weir_mapped_v4(sin6->addr, dst->addr[0]);
	} else {
		weir_copy_ip6(sin6->addr, dst->addr);
	}
	sin6->scope_id = 0;
	WEIR_CTX(ctx->optlen) = sizeof(*sin6);
	WEIR_CTX(ctx->retval) = 0;
	return WEIR_SOCKOPT_CONTINUE;
}

int weir_getsockopt(struct bpf_sockopt *ctx)
{
	/* The zero-copy receive fast path hands us kernel memory: never touch it. */
	if (ctx->level == WEIR_SOL_TCP && ctx->optname == WEIR_TCP_ZEROCOPY_RECEIVE)
		return WEIR_SOCKOPT_CONTINUE;
	int want_v4 = ctx->level == WEIR_SOL_IP && ctx->optname == WEIR_SO_ORIGINAL_DST;
	int want_v6 = ctx->level == WEIR_SOL_IPV6 && ctx->optname == WEIR_SO_ORIGINAL_DST;
	if (!(want_v4 || want_v6) || ctx->retval == 0)
		return weir_pass(ctx);
	struct bpf_sock *sk = ctx->sk;
	if (!sk)
		return weir_pass(ctx);

	/* Read every field unconditionally, each at its fixed offset (see sockops). */
	__u32 src4 = WEIR_CTX(sk->src_ip4), dst4 = WEIR_CTX(sk->dst_ip4);
	__u32 src6[4], dst6[4];
	src6[0] = WEIR_CTX(sk->src_ip6[0]);
	src6[1] = WEIR_CTX(sk->src_ip6[1]);
	src6[2] = WEIR_CTX(sk->src_ip6[2]);
	src6[3] = WEIR_CTX(sk->src_ip6[3]);
	dst6[0] = WEIR_CTX(sk->dst_ip6[0]);
	dst6[1] = WEIR_CTX(sk->dst_ip6[1]);
	dst6[2] = WEIR_CTX(sk->dst_ip6[2]);
	dst6[3] = WEIR_CTX(sk->dst_ip6[3]);

	struct weir_conn_key key = {};
	key.netns_cookie = bpf_get_netns_cookie(ctx);
	if (sk->family == AF_INET) {
		weir_mapped_v4(key.local_ip, src4);
		weir_mapped_v4(key.peer_ip, dst4);
	} else {
		weir_copy_ip6(key.local_ip, src6);
		weir_copy_ip6(key.peer_ip, dst6);
	}
	key.local_port = (__u16)sk->src_port;
	key.peer_port = bpf_ntohs(sk->dst_port);
	struct weir_orig_dst *dst = weir_orig_dst.lookup(&key);
	if (!dst)
		return weir_pass(ctx);
	struct weir_orig_dst found = *dst;
	return want_v4 ? weir_answer_v4(ctx, &found) : weir_answer_v6(ctx, &found);
}
