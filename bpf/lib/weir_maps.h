/* Types and maps shared by every Weir program.
 *
 * The agent fills the per-pod maps (node_agent/redirect/ebpf/maps.py encodes
 * the same layouts; change both together). The connection maps are filled
 * here, at connect/lookup time, and read by the getsockopt program.
 * Addresses in connection keys are always 16 bytes, IPv4 as ::ffff:a.b.c.d,
 * so an IPv4 connection from a dual-stack IPv6 socket meets the proxy's IPv4
 * socket under the same key.
 */
#ifndef WEIR_MAPS_H
#define WEIR_MAPS_H

#include <uapi/linux/bpf.h>
#include <linux/in.h>
#include <linux/net.h>
#include <linux/socket.h>

/* A captured pod, keyed by its netns cookie. Presence means "capture". */
struct weir_pod {
	__u32 flags; /* WEIR_POD_* */
	__u32 reserved;
};

/* A port rule of one pod: excluded (either direction) or included (inbound). */
struct weir_port_key {
	__u64 netns_cookie;
	__u16 port; /* host byte order */
	__u8 direction; /* WEIR_DIR_* */
	__u8 reserved[5];
};

/* Longest-prefix match on (netns cookie, family, address): outbound
 * destinations that bypass the proxy (excluded CIDRs, the pod's own
 * addresses). prefixlen counts the 64 cookie bits and 32 family bits too. */
struct weir_cidr_key {
	__u32 prefixlen;
	__u32 netns_cookie_lo;
	__u32 netns_cookie_hi;
	__u32 family; /* 4 or 6 */
	__u32 addr[4]; /* network byte order; IPv4 in addr[0] */
};

/* An address of a captured pod; sk_lookup cannot read the netns cookie, so
 * inbound capture finds the pod by the address a connection is arriving at. */
struct weir_addr {
	__u32 family; /* 4 or 6 */
	__u32 addr[4]; /* network byte order; IPv4 in addr[0] */
};

/* The proxy's inbound listener of one pod, per address family. */
struct weir_listener_key {
	__u64 netns_cookie;
	__u32 family; /* AF_INET or AF_INET6 */
	__u32 reserved;
};

/* Where a captured connection was going. */
struct weir_orig_dst {
	__u32 addr[4]; /* network byte order; IPv4 in addr[0] */
	__u16 port; /* host byte order */
	__u16 family; /* 4 or 6 */
};

/* One connection as the proxy's accepted socket sees it. */
struct weir_conn_key {
	__u64 netns_cookie;
	__u32 local_ip[4]; /* IPv4 as ::ffff:a.b.c.d */
	__u32 peer_ip[4];
	__u16 local_port; /* host byte order */
	__u16 peer_port;
	__u32 reserved;
};

BPF_HASH(weir_pods, __u64, struct weir_pod, WEIR_MAX_PODS);
BPF_HASH(weir_ports, struct weir_port_key, __u8, WEIR_MAX_PORT_RULES);
BPF_F_TABLE("lpm_trie", struct weir_cidr_key, __u8, weir_cidrs, WEIR_MAX_CIDR_RULES,
	    BPF_F_NO_PREALLOC);
BPF_HASH(weir_pod_addrs, struct weir_addr, __u64, WEIR_MAX_POD_ADDRS);
BPF_TABLE("sockhash", struct weir_listener_key, __u64, weir_listeners, WEIR_MAX_LISTENERS);
/* Socket cookie -> original destination, from connect() until the handshake
 * completes (sockops then re-keys it by the connection). LRU: an entry whose
 * connect failed is never read again and ages out. */
BPF_TABLE("lru_hash", __u64, struct weir_orig_dst, weir_sock_dst, WEIR_MAX_CONNECTIONS);
BPF_TABLE("lru_hash", struct weir_conn_key, struct weir_orig_dst, weir_orig_dst,
	  WEIR_MAX_CONNECTIONS);

#endif
