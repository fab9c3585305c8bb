/* Host program built and run by build.rs: prints the C layout of every
 * shared struct as `name size` / `name.field offset` lines, so a Rust test
 * can prove that the #[repr(C)] mirrors match byte for byte. */
#define FERRY_HOST 1
#include <stddef.h>
#include <stdio.h>
#include "ferry_maps.h"

#define S(t) printf(#t " %zu\n", sizeof(struct t))
#define F(t, f) printf(#t "." #f " %zu\n", offsetof(struct t, f))

int main(void)
{
	S(ferry_svc_key); F(ferry_svc_key, addr); F(ferry_svc_key, port); F(ferry_svc_key, proto);
	S(ferry_svc_val); F(ferry_svc_val, id); F(ferry_svc_val, count); F(ferry_svc_val, flags);
	F(ferry_svc_val, affinity_timeout);
	S(ferry_backend_key); F(ferry_backend_key, id); F(ferry_backend_key, slot);
	S(ferry_backend); F(ferry_backend, addr); F(ferry_backend, port);
	S(ferry_affinity_key); F(ferry_affinity_key, netns_cookie); F(ferry_affinity_key, id);
	S(ferry_affinity_val); F(ferry_affinity_val, last_used_ns); F(ferry_affinity_val, backend);
	F(ferry_affinity_val, slot);
	S(ferry_revnat_key); F(ferry_revnat_key, cookie); F(ferry_revnat_key, addr); F(ferry_revnat_key, port);
	S(ferry_revnat_val); F(ferry_revnat_val, addr); F(ferry_revnat_val, port);
	return 0;
}
