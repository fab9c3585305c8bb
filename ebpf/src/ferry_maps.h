/* Key/value layouts shared by the BPF programs (C) and the loader (Rust,
 * ebpf/src/lib.rs). Every struct has explicit padding so that the Rust
 * #[repr(C)] mirror has no implicit holes; build.rs compiles a host program
 * from this header that prints sizeof/offsetof, and a Rust test compares.
 *
 * Addresses and ports are in network byte order, exactly as the kernel hands
 * them to cgroup/sock_addr programs, so the fast path never swaps bytes. */
#ifndef FERRY_MAPS_H
#define FERRY_MAPS_H

#ifndef FERRY_HOST
#include <linux/types.h>
#else
#include <stdint.h>
typedef uint8_t __u8;
typedef uint16_t __u16;
typedef uint32_t __u32;
typedef uint64_t __u64;
#endif

/* ferry_svc_val.flags */
#define FERRY_SVC_AFFINITY 0x1 /* sessionAffinity: ClientIP */
#define FERRY_SVC_EXT_LOCAL 0x2 /* externalTrafficPolicy: Local (TC: no SNAT) */
#define FERRY_SVC_DROP 0x4 /* count == 0 and remote endpoints exist: drop, not reject */

/* ferry_svc_key.scope */
#define FERRY_SCOPE_SOCKET 0 /* read by the socket LB (connects on this node) */
#define FERRY_SCOPE_EXTERNAL 1 /* read by the TC program (packets from outside) */

/* A frontend: service IP (ClusterIP, node IP for NodePort, externalIP, LB IP),
 * port and L4 protocol (IPPROTO_TCP / IPPROTO_UDP). */
struct ferry_svc_key {
	__u32 addr;
	__u16 port;
	__u8 proto;
	__u8 scope; /* FERRY_SCOPE_* */
};

/* What a frontend maps to: its backend set `id` with `count` slots
 * (0..count-1 in ferry_backends). count == 0 means "reject". */
struct ferry_svc_val {
	__u32 id;
	__u16 count;
	__u16 flags;
	__u32 affinity_timeout; /* seconds; used when FERRY_SVC_AFFINITY */
	__u32 pad;
};

struct ferry_backend_key {
	__u32 id;
	__u32 slot;
};

struct ferry_backend {
	__u32 addr;
	__u16 port;
	__u16 pad;
};

/* ClientIP affinity. A socket-level LB sees a socket, not a packet: the
 * client identity is the network namespace (one per pod), as in Cilium. */
struct ferry_affinity_key {
	__u64 netns_cookie;
	__u32 id;
	__u32 pad;
};

struct ferry_affinity_val {
	__u64 last_used_ns;
	struct ferry_backend backend;
	__u32 slot;
	__u32 pad;
};

/* Reverse NAT: (socket, backend) → the service address the application
 * asked for, so getpeername() and recvmsg() show the service address. */
struct ferry_revnat_key {
	__u64 cookie;
	__u32 addr;
	__u16 port;
	__u16 pad;
};

struct ferry_revnat_val {
	__u32 addr;
	__u16 port;
	__u16 pad;
};

/* TC conntrack: a packet's 4-tuple + protocol as seen on the wire → the
 * 4-tuple to rewrite it to. One entry per direction of a translated flow. */
struct ferry_ct_key {
	__u32 saddr;
	__u32 daddr;
	__u16 sport;
	__u16 dport;
	__u8 proto;
	__u8 pad[3];
};

struct ferry_ct_val {
	__u32 saddr;
	__u32 daddr;
	__u16 sport;
	__u16 dport;
	__u32 flags; /* FERRY_CT_* */
	__u64 last_seen_ns;
};

#define FERRY_CT_REPLY 0x1 /* a reply-direction entry (reverse translation) */

#endif
