// SPDX-License-Identifier: GPL-2.0
/* Per-packet service translation for traffic from outside the node to
 * NodePort / externalIP / LoadBalancer frontends (ferry's eBPF dataplane).
 * Connections made *on* the node never get here translated: the socket LB
 * (sock.bpf.c) rewrote them at connect().
 *
 * ferry_tc_ingress runs (tcx ingress) on the node's devices:
 *  - a packet to a frontend (scope FERRY_SCOPE_EXTERNAL in ferry_services)
 *    is DNATed to a backend; with externalTrafficPolicy Cluster it is also
 *    SNATed to the node IP so the reply comes back through this node, and
 *    then sent straight to the backend's device (fib lookup + redirect_neigh;
 *    the stack would drop a packet that arrives with a local source address).
 *    With eTP Local only local backends are used, the client address is kept
 *    and the packet continues into the stack, which routes it to the pod.
 *  - a reply of a translated flow (reverse entry in ferry_ct) is translated
 *    back (source = the frontend, destination = the client) and redirected
 *    out of the device towards the client.
 * ferry_tc_egress runs (tcx egress) on the same devices and translates
 * replies that the stack routed out without passing one of our ingress
 * hooks (eTP Local replies of local pods go pod → bridge → forward → out).
 *
 * ferry_ct is an LRU: a flow lives as long as it is used. A TCP SYN (new
 * connection on a reused 4-tuple) or an idle flow picks a backend afresh.
 * Not our packet → TC_ACT_UNSPEC, so other tcx programs still run. */
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/pkt_cls.h>
#include <linux/socket.h>
#include <linux/tcp.h>
#include <linux/udp.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

#include "shared_maps.bpf.h"

#define NSEC_PER_SEC 1000000000ULL
#define AF_INET 2
#define CT_IDLE_TCP_NS (600 * NSEC_PER_SEC)
#define CT_IDLE_UDP_NS (60 * NSEC_PER_SEC)
#define SNAT_PORT_MIN 32768
#define SNAT_PORT_RANGE 28232
#define SNAT_TRIES 8
/* Affinity entries of clients outside the node: the "netns cookie" is the
 * client address with the top bit set (real cookies are small counters). */
#define AFFINITY_EXTERNAL (1ULL << 63)

char LICENSE[] SEC("license") = "GPL";

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__type(key, struct ferry_ct_key);
	__type(value, struct ferry_ct_val);
	__uint(max_entries, 262144);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} ferry_ct SEC(".maps");

/* [0] = the node IPv4 address used as SNAT source (network order; 0 = the
 * frontend address the packet was sent to). Written by the loader. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__type(key, __u32);
	__type(value, __u32);
	__uint(max_entries, 1);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} ferry_tc_config SEC(".maps");

struct pkt {
	__u32 l3; /* offset of the IPv4 header */
	__u32 l4;
	__u32 csum_off; /* offset of the L4 checksum */
	__u32 saddr, daddr;
	__u16 sport, dport;
	__u8 proto;
	__u8 tcp_flags;
	__u8 udp_nocsum;
};

static __always_inline int parse(struct __sk_buff *skb, struct pkt *p)
{
	struct iphdr ip;
	__u16 ports[2];

	if (skb->protocol != bpf_htons(ETH_P_IP))
		return -1;
	p->l3 = ETH_HLEN;
	if (bpf_skb_load_bytes(skb, p->l3, &ip, sizeof(ip)) < 0)
		return -1;
	if (ip.ihl < 5 || (ip.frag_off & bpf_htons(0x1fff)))
		return -1; /* later fragments carry no ports */
	p->l4 = p->l3 + ip.ihl * 4;
	p->proto = ip.protocol;
	p->saddr = ip.saddr;
	p->daddr = ip.daddr;
	if (bpf_skb_load_bytes(skb, p->l4, ports, sizeof(ports)) < 0)
		return -1;
	p->sport = ports[0];
	p->dport = ports[1];
	p->tcp_flags = 0;
	p->udp_nocsum = 0;
	if (p->proto == IPPROTO_TCP) {
		p->csum_off = p->l4 + offsetof(struct tcphdr, check);
		if (bpf_skb_load_bytes(skb, p->l4 + 13, &p->tcp_flags, 1) < 0)
			return -1;
	} else if (p->proto == IPPROTO_UDP) {
		__u16 c;

		p->csum_off = p->l4 + offsetof(struct udphdr, check);
		if (bpf_skb_load_bytes(skb, p->csum_off, &c, 2) < 0)
			return -1;
		p->udp_nocsum = c == 0;
	} else {
		return -1;
	}
	return 0;
}

static __always_inline int set_addr(struct __sk_buff *skb, struct pkt *p, __u32 field, __u32 from, __u32 to)
{
	if (from == to)
		return 0;
	if (!p->udp_nocsum &&
	    bpf_l4_csum_replace(skb, p->csum_off, from, to, BPF_F_PSEUDO_HDR | BPF_F_MARK_MANGLED_0 | 4) < 0)
		return -1;
	if (bpf_l3_csum_replace(skb, p->l3 + offsetof(struct iphdr, check), from, to, 4) < 0)
		return -1;
	return bpf_skb_store_bytes(skb, p->l3 + field, &to, 4, 0);
}

static __always_inline int set_port(struct __sk_buff *skb, struct pkt *p, __u32 off, __u16 from, __u16 to)
{
	if (from == to)
		return 0;
	if (!p->udp_nocsum && bpf_l4_csum_replace(skb, p->csum_off, from, to, BPF_F_MARK_MANGLED_0 | 2) < 0)
		return -1;
	return bpf_skb_store_bytes(skb, p->l4 + off, &to, 2, 0);
}

/* Rewrites the packet's 4-tuple to `to`. */
static __always_inline int rewrite(struct __sk_buff *skb, struct pkt *p, const struct ferry_ct_val *to)
{
	if (set_addr(skb, p, offsetof(struct iphdr, saddr), p->saddr, to->saddr) < 0 ||
	    set_addr(skb, p, offsetof(struct iphdr, daddr), p->daddr, to->daddr) < 0 ||
	    set_port(skb, p, 0, p->sport, to->sport) < 0 || set_port(skb, p, 2, p->dport, to->dport) < 0)
		return -1;
	return 0;
}

/* Sends the (rewritten) packet out of the device the route to its
 * destination uses, resolving the next hop's MAC from the neighbour table. */
static __always_inline int redirect_routed(struct __sk_buff *skb, const struct ferry_ct_val *to, __u8 proto)
{
	struct bpf_fib_lookup fib = {
		.family = AF_INET,
		.l4_protocol = proto,
		.sport = to->sport,
		.dport = to->dport,
		.tot_len = (__u16)(skb->len - ETH_HLEN), /* host order */
		.ipv4_src = to->saddr,
		.ipv4_dst = to->daddr,
		.ifindex = skb->ingress_ifindex,
	};
	long rc = bpf_fib_lookup(skb, &fib, sizeof(fib), BPF_FIB_LOOKUP_SKIP_NEIGH);

	if (rc != BPF_FIB_LKUP_RET_SUCCESS && rc != BPF_FIB_LKUP_RET_NO_NEIGH)
		return TC_ACT_SHOT;
	return bpf_redirect_neigh(fib.ifindex, NULL, 0, 0);
}

static __always_inline int idle_expired(const struct ferry_ct_val *v, __u8 proto, __u64 now)
{
	__u64 idle = proto == IPPROTO_TCP ? CT_IDLE_TCP_NS : CT_IDLE_UDP_NS;

	return now - v->last_seen_ns > idle;
}

static __always_inline struct ferry_backend *pick(const struct ferry_svc_val *svc, __u32 client, __u64 now)
{
	struct ferry_affinity_key akey = {
		.netns_cookie = AFFINITY_EXTERNAL | client,
		.id = svc->id,
	};
	struct ferry_backend_key bkey = { .id = svc->id };
	struct ferry_backend *be;

	if (svc->flags & FERRY_SVC_AFFINITY) {
		struct ferry_affinity_val *aff = bpf_map_lookup_elem(&ferry_affinity, &akey);

		if (aff && now - aff->last_used_ns <= (__u64)svc->affinity_timeout * NSEC_PER_SEC &&
		    aff->slot < svc->count) {
			bkey.slot = aff->slot;
			be = bpf_map_lookup_elem(&ferry_backends, &bkey);
			if (be && be->addr == aff->backend.addr && be->port == aff->backend.port) {
				aff->last_used_ns = now;
				return be;
			}
		}
	}
	bkey.slot = bpf_get_prandom_u32() % svc->count;
	be = bpf_map_lookup_elem(&ferry_backends, &bkey);
	if (be && (svc->flags & FERRY_SVC_AFFINITY)) {
		struct ferry_affinity_val nv = {
			.last_used_ns = now,
			.backend = *be,
			.slot = bkey.slot,
		};
		bpf_map_update_elem(&ferry_affinity, &akey, &nv, BPF_ANY);
	}
	return be;
}

/* A new flow to a frontend: choose a backend, record both directions. */
static __always_inline int new_flow(struct __sk_buff *skb, struct pkt *p, const struct ferry_svc_val *svc,
				    struct ferry_ct_key *fkey, __u64 now)
{
	struct ferry_backend *be;
	struct ferry_ct_val fwd = {}, rev = {};
	struct ferry_ct_key rkey = { .proto = p->proto };
	int snat = !(svc->flags & FERRY_SVC_EXT_LOCAL);
	__u32 zero = 0, *node_ip;
	int i;

	if (svc->count == 0) {
		/* No endpoint at all: let the stack answer (nothing listens on
		 * the frontend, so TCP gets a reset, UDP port unreachable).
		 * eTP Local without local endpoints: drop, as kube-proxy does. */
		return (svc->flags & FERRY_SVC_DROP) ? TC_ACT_SHOT : TC_ACT_UNSPEC;
	}
	be = pick(svc, p->saddr, now);
	if (!be)
		return TC_ACT_SHOT;
	fwd.saddr = p->saddr;
	fwd.sport = p->sport;
	fwd.daddr = be->addr;
	fwd.dport = be->port;
	fwd.last_seen_ns = now;
	if (snat) {
		node_ip = bpf_map_lookup_elem(&ferry_tc_config, &zero);
		fwd.saddr = (node_ip && *node_ip) ? *node_ip : p->daddr;
	}
	rkey.saddr = fwd.daddr;
	rkey.sport = fwd.dport;
	rkey.daddr = fwd.saddr;
	/* Keep the client's port unless another flow to this backend holds it. */
	for (i = 0; i < SNAT_TRIES; i++) {
		struct ferry_ct_val *other;

		rkey.dport = fwd.sport;
		other = bpf_map_lookup_elem(&ferry_ct, &rkey);
		if (!other || (other->daddr == p->saddr && other->dport == p->sport) ||
		    idle_expired(other, p->proto, now))
			break;
		if (!snat)
			break; /* client address kept: the tuple is the client's own */
		fwd.sport = bpf_htons((__u16)(SNAT_PORT_MIN + bpf_get_prandom_u32() % SNAT_PORT_RANGE));
	}
	if (i == SNAT_TRIES)
		return TC_ACT_SHOT;
	rev.saddr = p->daddr;
	rev.sport = p->dport;
	rev.daddr = p->saddr;
	rev.dport = p->sport;
	rev.flags = FERRY_CT_REPLY;
	rev.last_seen_ns = now;
	if (bpf_map_update_elem(&ferry_ct, &rkey, &rev, BPF_ANY) < 0 ||
	    bpf_map_update_elem(&ferry_ct, fkey, &fwd, BPF_ANY) < 0)
		return TC_ACT_SHOT;
	if (rewrite(skb, p, &fwd) < 0)
		return TC_ACT_SHOT;
	return snat ? redirect_routed(skb, &fwd, p->proto) : TC_ACT_OK;
}

static __always_inline int handle(struct __sk_buff *skb, int ingress)
{
	struct pkt p;
	struct ferry_ct_key key = {};
	struct ferry_ct_val *ct;
	struct ferry_svc_val *svc;
	__u64 now;

	if (parse(skb, &p) < 0)
		return TC_ACT_UNSPEC;
	key.saddr = p.saddr;
	key.daddr = p.daddr;
	key.sport = p.sport;
	key.dport = p.dport;
	key.proto = p.proto;
	now = bpf_ktime_get_ns();
	ct = bpf_map_lookup_elem(&ferry_ct, &key);
	if (ct && !(ct->flags & FERRY_CT_REPLY) && ingress) {
		int fresh = p.proto == IPPROTO_TCP && (p.tcp_flags & 0x12) == 0x02; /* SYN, no ACK */

		if (!fresh && !idle_expired(ct, p.proto, now)) {
			struct ferry_ct_val to = *ct;
			int snat = to.saddr != p.saddr;

			ct->last_seen_ns = now;
			if (rewrite(skb, &p, &to) < 0)
				return TC_ACT_SHOT;
			return snat ? redirect_routed(skb, &to, p.proto) : TC_ACT_OK;
		}
	} else if (ct && (ct->flags & FERRY_CT_REPLY)) {
		struct ferry_ct_val to = *ct;

		ct->last_seen_ns = now;
		if (rewrite(skb, &p, &to) < 0)
			return TC_ACT_SHOT;
		/* At ingress the source is now a local address, which the stack
		 * would drop as martian: send it out towards the client directly. */
		return ingress ? redirect_routed(skb, &to, p.proto) : TC_ACT_OK;
	}
	if (!ingress)
		return TC_ACT_UNSPEC;
	{
		struct ferry_svc_key skey = {
			.addr = p.daddr,
			.port = p.dport,
			.proto = p.proto,
			.scope = FERRY_SCOPE_EXTERNAL,
		};

		svc = bpf_map_lookup_elem(&ferry_services, &skey);
	}
	if (!svc)
		return TC_ACT_UNSPEC;
	return new_flow(skb, &p, svc, &key, now);
}

SEC("classifier")
int ferry_tc_ingress(struct __sk_buff *skb)
{
	return handle(skb, 1);
}

SEC("classifier")
int ferry_tc_egress(struct __sk_buff *skb)
{
	return handle(skb, 0);
}
