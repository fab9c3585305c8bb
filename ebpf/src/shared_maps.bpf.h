/* Maps both BPF objects (sock.bpf.c, tc.bpf.c) use. Pinned by name, so the
 * object loaded second opens the pins the first one made: the socket LB and
 * the TC program read the same services, backends and affinity entries.
 * Both definitions must stay identical, hence one header. */
#ifndef FERRY_SHARED_MAPS_H
#define FERRY_SHARED_MAPS_H

#include "ferry_maps.h"

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, struct ferry_svc_key);
	__type(value, struct ferry_svc_val);
	__uint(max_entries, 262144);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} ferry_services SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, struct ferry_backend_key);
	__type(value, struct ferry_backend);
	__uint(max_entries, 1048576);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} ferry_backends SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__type(key, struct ferry_affinity_key);
	__type(value, struct ferry_affinity_val);
	__uint(max_entries, 65536);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} ferry_affinity SEC(".maps");

#endif
