/*
 * libvirt's client on vireo's event loop: prints domain lifecycle events as they happen.
 *
 *   cargo build --release -p vireo-libvirt
 *   cc -o events libvirt/examples/events.c -Ilibvirt/include -Ltarget/release \
 *      -Wl,-rpath,$PWD/target/release -lvireo_libvirt -lvirt
 *   ./events 'test+unix:///default?socket=/run/user/1000/libvirt/libvirt-sock'
 *
 * Arguments: URI [KEEPALIVE_INTERVAL_S [KEEPALIVE_COUNT]] (defaults: test:///default, 1, 3).
 * Backend: VIREO_BACKEND=poll|epoll|io-uring|portable|auto. Stops on end of input (Ctrl-D)
 * or when the connection closes. Each line:
 *   backend NAME | ready | event DOMAIN EVENT DETAIL ON_LOOP | close REASON ON_LOOP | done
 * where ON_LOOP is 1 when the callback ran on vireo's loop thread.
 */
#include <poll.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

#include <libvirt/libvirt.h>

#include "vireo-libvirt.h"

static atomic_int closed;

static const char *event_name(int event)
{
    static const char *names[] = {"defined", "undefined", "started", "suspended", "resumed",
                                  "stopped", "shutdown", "pmsuspended", "crashed"};
    return event >= 0 && event < (int)(sizeof names / sizeof names[0]) ? names[event] : "other";
}

static int on_lifecycle(virConnectPtr conn, virDomainPtr dom, int event, int detail,
                        void *opaque)
{
    (void)conn;
    (void)opaque;
    printf("event %s %s %d %d\n", virDomainGetName(dom), event_name(event), detail,
           vireo_libvirt_is_loop_thread());
    fflush(stdout);
    return 0;
}

static void on_close(virConnectPtr conn, int reason, void *opaque)
{
    (void)conn;
    (void)opaque;
    printf("close %d %d\n", reason, vireo_libvirt_is_loop_thread());
    fflush(stdout);
    atomic_store(&closed, 1);
}

int main(int argc, char **argv)
{
    const char *uri = argc > 1 ? argv[1] : "test:///default";
    int interval = argc > 2 ? atoi(argv[2]) : 1;
    int count = argc > 3 ? atoi(argv[3]) : 3;

    if (vireo_libvirt_start() < 0) {
        fprintf(stderr, "vireo: %s\n", vireo_libvirt_last_error());
        return 1;
    }
    printf("backend %s\n", vireo_libvirt_backend());

    virConnectPtr conn = virConnectOpen(uri);
    if (!conn) {
        fprintf(stderr, "cannot connect to %s\n", uri);
        return 1;
    }
    if (virConnectSetKeepAlive(conn, interval, count) < 0)
        fprintf(stderr, "keepalive not available on %s\n", uri);
    virConnectRegisterCloseCallback(conn, on_close, NULL, NULL);
    int callback = virConnectDomainEventRegisterAny(conn, NULL, VIR_DOMAIN_EVENT_ID_LIFECYCLE,
                                                    VIR_DOMAIN_EVENT_CALLBACK(on_lifecycle),
                                                    NULL, NULL);
    if (callback < 0) {
        fprintf(stderr, "cannot subscribe to domain events\n");
        return 1;
    }
    printf("ready\n");
    fflush(stdout);

    while (!atomic_load(&closed)) {
        struct pollfd input = {.fd = 0, .events = POLLIN};
        if (poll(&input, 1, 100) > 0) {
            char buf[256];
            if (read(0, buf, sizeof buf) <= 0)
                break;
        }
    }
    if (!atomic_load(&closed)) {
        virConnectDomainEventDeregisterAny(conn, callback);
        virConnectUnregisterCloseCallback(conn, on_close);
    }
    virConnectClose(conn);
    vireo_libvirt_stop();
    printf("done\n");
    return 0;
}
