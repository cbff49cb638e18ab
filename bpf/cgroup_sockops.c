/* sockops: when a redirected connect completes its handshake, file its
 * original destination under the connection as the proxy will see it
 * (local = the proxy's listener, peer = the client's address and source
 * port), which connect4/6 could not do: the source port did not exist yet.
 * The client's ESTABLISHED callback runs on the SYN-ACK, before the final
 * ACK, so the entry is in place before the proxy can accept the connection.
 * Sockets that connect4/6 did not redirect have no cookie entry: a lookup
 * miss and nothing else. */
#include "lib/weir_policy.h"

int weir_sockops(struct bpf_sock_ops *skops)
{
	if (skops->op != BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB)
		return WEIR_SOCKOPS_OK;
	__u64 cookie = bpf_get_socket_cookie(skops);
	struct weir_orig_dst *found = weir_sock_dst.lookup(&cookie);
	if (!found)
		return WEIR_SOCKOPS_OK;
	struct weir_orig_dst dst = *found;

	/* Every field is read unconditionally, each at its fixed offset: clang
	 * must not merge reads of different fields into one computed load. */
	__u32 remote4 = WEIR_CTX(skops->remote_ip4), local4 = WEIR_CTX(skops->local_ip4);
	__u32 remote6[4], local6[4];
	remote6[0] = WEIR_CTX(skops->remote_ip6[0]);
	remote6[1] = WEIR_CTX(skops->remote_ip6[1]);
	remote6[2] = WEIR_CTX(skops->remote_ip6[2]);
	remote6[3] = WEIR_CTX(skops->remote_ip6[3]);
	local6[0] = WEIR_CTX(skops->local_ip6[0]);
	local6[1] = WEIR_CTX(skops->local_ip6[1]);
	local6[2] = WEIR_CTX(skops->local_ip6[2]);
	local6[3] = WEIR_CTX(skops->local_ip6[3]);

	struct weir_conn_key key = {};
	key.netns_cookie = bpf_get_netns_cookie(skops);
	if (skops->family == AF_INET) {
		weir_mapped_v4(key.local_ip, remote4);
		weir_mapped_v4(key.peer_ip, local4);
	} else {
		/* A dual-stack socket's IPv4 connection already reads as ::ffff:a.b.c.d. */
		weir_copy_ip6(key.local_ip, remote6);
		weir_copy_ip6(key.peer_ip, local6);
	}
	/* remote_port is the network-order port shifted into the upper half. */
	key.local_port = (__u16)bpf_ntohl(skops->remote_port);
	key.peer_port = (__u16)skops->local_port;
	weir_orig_dst.update(&key, &dst);
	weir_sock_dst.delete(&cookie);
	return WEIR_SOCKOPS_OK;
}
