// SPDX-License-Identifier: GPL-2.0
/* Socket-level service load balancing (ferry's eBPF dataplane).
 *
 * Instead of translating every packet, translate once per socket: when an
 * application connect()s (TCP, connected UDP) or sendmsg()s (unconnected
 * UDP) to a service frontend, rewrite the destination to one backend before
 * the kernel routes anything. Replies need no translation on the wire; only
 * what the application *sees* is mapped back (recvmsg source address,
 * getpeername) through the reverse-NAT map.
 *
 * Maps are pinned by name, so a restarted ferry adopts them (and the links
 * keep running the same programs meanwhile). */
#include <linux/bpf.h>
#include <linux/in.h>
#include <bpf/bpf_helpers.h>

#include "ferry_maps.h"

#define ECONNREFUSED 111
#define NSEC_PER_SEC 1000000000ULL

char LICENSE[] SEC("license") = "GPL";

#include "shared_maps.bpf.h"

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__type(key, struct ferry_revnat_key);
	__type(value, struct ferry_revnat_val);
	__uint(max_entries, 131072);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} ferry_revnat SEC(".maps");

/* Picks a backend for `svc`: the affinity entry when it is fresh and its
 * slot still holds the same backend, else a random slot. */
static __always_inline struct ferry_backend *
pick_backend(struct bpf_sock_addr *ctx, const struct ferry_svc_val *svc)
{
	struct ferry_affinity_key akey = {};
	struct ferry_backend_key bkey = { .id = svc->id };
	struct ferry_backend *be;
	__u64 now = 0;

	if (svc->flags & FERRY_SVC_AFFINITY) {
		struct ferry_affinity_val *aff;

		akey.netns_cookie = bpf_get_netns_cookie(ctx);
		akey.id = svc->id;
		now = bpf_ktime_get_ns();
		aff = bpf_map_lookup_elem(&ferry_affinity, &akey);
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

/* Shared by connect4 and sendmsg4. Returns 1 to let the call proceed
 * (rewritten or untouched), 0 with ECONNREFUSED when the frontend has no
 * backends: a service without endpoints refuses at once. */
static __always_inline int translate(struct bpf_sock_addr *ctx)
{
	struct ferry_svc_key key = {
		.addr = ctx->user_ip4,
		.port = (__u16)ctx->user_port,
		.proto = (__u8)ctx->protocol,
	};
	struct ferry_svc_val *svc;
	struct ferry_backend *be;

	svc = bpf_map_lookup_elem(&ferry_services, &key);
	if (!svc)
		return 1;
	if (svc->count == 0)
		goto refuse;
	be = pick_backend(ctx, svc);
	if (!be)
		goto refuse;

	struct ferry_revnat_key rkey = {
		.cookie = bpf_get_socket_cookie(ctx),
		.addr = be->addr,
		.port = be->port,
	};
	struct ferry_revnat_val rval = { .addr = key.addr, .port = key.port };
	bpf_map_update_elem(&ferry_revnat, &rkey, &rval, BPF_ANY);

	ctx->user_ip4 = be->addr;
	ctx->user_port = (__u32)be->port;
	return 1;
refuse:
	bpf_set_retval(-ECONNREFUSED);
	return 0;
}

/* Maps a backend address the application would see back to the service. */
static __always_inline void reverse(struct bpf_sock_addr *ctx)
{
	struct ferry_revnat_key rkey = {
		.cookie = bpf_get_socket_cookie(ctx),
		.addr = ctx->user_ip4,
		.port = (__u16)ctx->user_port,
	};
	struct ferry_revnat_val *rval = bpf_map_lookup_elem(&ferry_revnat, &rkey);

	if (rval) {
		ctx->user_ip4 = rval->addr;
		ctx->user_port = (__u32)rval->port;
	}
}

SEC("cgroup/connect4")
int ferry_connect4(struct bpf_sock_addr *ctx)
{
	return translate(ctx);
}

SEC("cgroup/sendmsg4")
int ferry_sendmsg4(struct bpf_sock_addr *ctx)
{
	return translate(ctx);
}

SEC("cgroup/recvmsg4")
int ferry_recvmsg4(struct bpf_sock_addr *ctx)
{
	reverse(ctx);
	return 1;
}

SEC("cgroup/getpeername4")
int ferry_getpeername4(struct bpf_sock_addr *ctx)
{
	reverse(ctx);
	return 1;
}
