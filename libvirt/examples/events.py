#!/usr/bin/python3
"""python-libvirt on vireo's event loop: prints domain lifecycle events as they happen.

    cargo build --release -p vireo-libvirt
    VIREO_LIBVIRT_SO=target/release/libvireo_libvirt.so /usr/bin/python3 \
        libvirt/examples/events.py 'test+unix:///default?socket=/run/user/1000/libvirt/libvirt-sock'

Arguments: URI [KEEPALIVE_INTERVAL_S [KEEPALIVE_COUNT]] (defaults: test:///default, 1, 3).
Backend: VIREO_BACKEND. Stops on end of input (Ctrl-D) or when the connection closes. Prints
the same lines as events.c: backend, ready, event DOMAIN EVENT DETAIL ON_LOOP,
close REASON ON_LOOP, done.
"""
import ctypes
import os
import select
import sys
import threading

vireo = ctypes.CDLL(os.environ.get("VIREO_LIBVIRT_SO", "libvireo_libvirt.so"))
vireo.vireo_libvirt_backend.restype = ctypes.c_char_p
vireo.vireo_libvirt_last_error.restype = ctypes.c_char_p
# The same libvirt.so.0 as python-libvirt's: this registration is the one libvirt uses.
if vireo.vireo_libvirt_start() < 0:
    sys.exit("vireo: " + vireo.vireo_libvirt_last_error().decode())

import libvirt  # noqa: E402

NAMES = ["defined", "undefined", "started", "suspended", "resumed", "stopped", "shutdown",
         "pmsuspended", "crashed"]


def main():
    uri = sys.argv[1] if len(sys.argv) > 1 else "test:///default"
    interval = int(sys.argv[2]) if len(sys.argv) > 2 else 1
    count = int(sys.argv[3]) if len(sys.argv) > 3 else 3
    print("backend", vireo.vireo_libvirt_backend().decode(), flush=True)
    conn = libvirt.open(uri)
    try:
        conn.setKeepAlive(interval, count)
    except libvirt.libvirtError:
        print("keepalive not available on", uri, file=sys.stderr)
    closed = threading.Event()

    def on_close(_conn, reason, _opaque):
        print("close", reason, vireo.vireo_libvirt_is_loop_thread(), flush=True)
        closed.set()

    def on_lifecycle(_conn, dom, event, detail, _opaque):
        name = NAMES[event] if 0 <= event < len(NAMES) else "other"
        print("event", dom.name(), name, detail, vireo.vireo_libvirt_is_loop_thread(), flush=True)

    conn.registerCloseCallback(on_close, None)
    callback = conn.domainEventRegisterAny(None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE,
                                           on_lifecycle, None)
    print("ready", flush=True)
    while not closed.is_set():
        readable, _, _ = select.select([sys.stdin], [], [], 0.1)
        if readable and not os.read(sys.stdin.fileno(), 256):
            break
    if not closed.is_set():
        conn.domainEventDeregisterAny(callback)
        conn.unregisterCloseCallback()
    conn.close()
    vireo.vireo_libvirt_stop()
    print("done", flush=True)


main()
