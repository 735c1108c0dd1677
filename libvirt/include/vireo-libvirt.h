/*
 * vireo-libvirt: vireo as libvirt's event loop, for C and Python programs.
 *
 * Link with -lvireo_libvirt (target/release/libvireo_libvirt.so, built by
 * `cargo build --release -p vireo-libvirt`) or dlopen it, next to libvirt itself.
 *
 *     if (vireo_libvirt_start() < 0) {
 *         fprintf(stderr, "%s\n", vireo_libvirt_last_error());
 *         return 1;
 *     }
 *     virConnectPtr conn = virConnectOpen("test:///default");  // runs on vireo's loop
 *     ...
 *     virConnectClose(conn);
 *     vireo_libvirt_stop();
 *
 * The six event functions have libvirt's signatures (libvirt-event.h), so a program can also
 * pass them to virEventRegisterImpl itself; they act on the loop that vireo_libvirt_start
 * runs (or the one a Rust program set with vireo_libvirt::set_loop).
 */
#ifndef VIREO_LIBVIRT_H
#define VIREO_LIBVIRT_H

#ifdef __cplusplus
extern "C" {
#endif

/* The same types as libvirt's virEventHandleCallback, virEventTimeoutCallback and
 * virFreeCallback, so that this header needs no libvirt header. */
typedef void (*vireo_libvirt_handle_cb)(int watch, int fd, int events, void *opaque);
typedef void (*vireo_libvirt_timeout_cb)(int timer, void *opaque);
typedef void (*vireo_libvirt_free_cb)(void *opaque);

/* Starts a loop on its own thread (backend from VIREO_BACKEND, "auto" by default) and
 * registers it with libvirt (libvirt.so.0). Once per process, before the first
 * virConnectOpen. 0, or -1 with the reason in vireo_libvirt_last_error(). */
int vireo_libvirt_start(void);

/* Stops that loop and joins its thread (remaining free callbacks run there). Close every
 * connection first: libvirt keeps the registration. 0, or -1 when none was started or
 * when called from a callback (on the loop thread). */
int vireo_libvirt_stop(void);

/* 1 on the loop's thread during an iteration (inside a libvirt callback), else 0. */
int vireo_libvirt_is_loop_thread(void);

/* "epoll", "io-uring", "poll" or "portable" once started, else NULL. Static. */
const char *vireo_libvirt_backend(void);

/* Why this thread's last failing call failed, or NULL; valid until the next failing call
 * on the same thread. */
const char *vireo_libvirt_last_error(void);

/* libvirt's event implementation (virEventAddHandleFunc, ...). Ids are positive, count up
 * from 1 and are never reused; a remove never waits for a running callback and never calls
 * ff itself: ff(opaque) runs later on the loop thread. Updates of unknown ids are ignored,
 * removes of unknown ids return -1. Events: READABLE 1, WRITABLE 2, ERROR 4, HANGUP 8.
 * Timeouts in ms: -1 disabled, 0 every iteration, > 0 periodic. */
int vireo_libvirt_add_handle(int fd, int events, vireo_libvirt_handle_cb cb, void *opaque,
                             vireo_libvirt_free_cb ff);
void vireo_libvirt_update_handle(int watch, int events);
int vireo_libvirt_remove_handle(int watch);
int vireo_libvirt_add_timeout(int ms, vireo_libvirt_timeout_cb cb, void *opaque,
                              vireo_libvirt_free_cb ff);
void vireo_libvirt_update_timeout(int timer, int ms);
int vireo_libvirt_remove_timeout(int timer);

#ifdef __cplusplus
}
#endif

#endif /* VIREO_LIBVIRT_H */
