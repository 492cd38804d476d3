/* LD_PRELOAD shim for a single-machine `fleetlm serve`: every TCP listener
 * binds to the loopback interface, except the one port FLEETLM_LOOPBACK_KEEP_PORT
 * names (the HTTP port, bound where the user asked).
 *
 * Why: Ray's GCS, raylet, object manager, dashboard agent and core workers
 * listen on all interfaces (0.0.0.0 / ::) whatever the node IP is (Ray 2.60),
 * and whoever reaches them can run code on the machine. A local `fleetlm serve`
 * needs none of them outside the machine. Every bind() to a non-loopback
 * address is rewritten: IPv4 to 127.0.0.1; IPv6 to ::ffff:127.0.0.1 on a
 * dual-stack socket (so IPv4 clients of 127.0.0.1 still connect), ::1 on a
 * v6-only one. Everything else (Unix sockets, loopback binds) passes through.
 * cluster/loopback.py builds this file with the system C compiler.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <netinet/in.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

typedef int (*bind_fn)(int, const struct sockaddr *, socklen_t);
static bind_fn real_bind;
static int keep_port = -1;

__attribute__((constructor)) static void init(void) {
    real_bind = (bind_fn)dlsym(RTLD_NEXT, "bind");
    const char *k = getenv("FLEETLM_LOOPBACK_KEEP_PORT");
    if (k && *k) keep_port = atoi(k);
}

int bind(int fd, const struct sockaddr *addr, socklen_t len) {
    if (!real_bind) real_bind = (bind_fn)dlsym(RTLD_NEXT, "bind");
    if (addr && addr->sa_family == AF_INET && len >= (socklen_t)sizeof(struct sockaddr_in)) {
        struct sockaddr_in a;
        memcpy(&a, addr, sizeof a);
        if (ntohs(a.sin_port) != keep_port && (ntohl(a.sin_addr.s_addr) >> 24) != 127) {
            a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
            return real_bind(fd, (const struct sockaddr *)&a, sizeof a);
        }
    } else if (addr && addr->sa_family == AF_INET6 && len >= (socklen_t)sizeof(struct sockaddr_in6)) {
        struct sockaddr_in6 a;
        memcpy(&a, addr, sizeof a);
        static const unsigned char mapped_prefix[12] = {0,0,0,0,0,0,0,0,0,0,0xff,0xff};
        int is_v6_loopback = IN6_IS_ADDR_LOOPBACK(&a.sin6_addr);
        int is_mapped_loopback = memcmp(a.sin6_addr.s6_addr, mapped_prefix, 12) == 0 && a.sin6_addr.s6_addr[12] == 127;
        if (ntohs(a.sin6_port) != keep_port && !is_v6_loopback && !is_mapped_loopback) {
            int v6only = 0; socklen_t sl = sizeof v6only;
            getsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &v6only, &sl);
            memset(&a.sin6_addr, 0, sizeof a.sin6_addr);
            if (v6only) {
                a.sin6_addr.s6_addr[15] = 1;             /* ::1 */
            } else {
                memcpy(a.sin6_addr.s6_addr, mapped_prefix, 12);  /* ::ffff:127.0.0.1 */
                a.sin6_addr.s6_addr[12] = 127; a.sin6_addr.s6_addr[15] = 1;
            }
            return real_bind(fd, (const struct sockaddr *)&a, sizeof a);
        }
    }
    return real_bind(fd, addr, len);
}
