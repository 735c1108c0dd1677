"""Raw calls of libvirt's admin program on a Unix socket, for the differential test of
vireo's admin socket against libvirtd (rpc/tests/libvirt_admin.rs).

usage: raw_calls.py SOCKET PROC:HEXBODY ...
Opens the admin connection, makes each call and prints one line per call: "ok" or
"err CODE MESSAGE".
"""
import socket
import struct
import sys

ADMIN_PROGRAM = 0x06900690
KEEPALIVE_PROGRAM = 0x6B656570


def recv_exactly(sock, n):
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise EOFError("the daemon closed the connection")
        data += chunk
    return data


def call(sock, serial, procedure, body):
    header = struct.pack(">IIIIII", ADMIN_PROGRAM, 1, procedure, 0, serial, 0)
    sock.sendall(struct.pack(">I", 4 + len(header) + len(body)) + header + body)
    while True:
        (length,) = struct.unpack(">I", recv_exactly(sock, 4))
        frame = recv_exactly(sock, length - 4)
        program, _, _, _, reply_serial, status = struct.unpack(">IIIIII", frame[:24])
        if program == KEEPALIVE_PROGRAM or reply_serial != serial:
            continue
        return status, frame[24:]


def error_line(body):
    code, _domain, present = struct.unpack(">iiI", body[:12])
    message = ""
    if present:
        (n,) = struct.unpack(">I", body[12:16])
        message = body[16 : 16 + n].decode()
    return "err %d %s" % (code, message)


def main():
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(30)
    sock.connect(sys.argv[1])
    status, body = call(sock, 0, 1, struct.pack(">I", 0))
    if status != 0:
        print("open: " + error_line(body))
        return 1
    for serial, arg in enumerate(sys.argv[2:], start=1):
        procedure, hexbody = arg.split(":")
        status, body = call(sock, serial, int(procedure), bytes.fromhex(hexbody))
        print("ok" if status == 0 else error_line(body))
    call(sock, len(sys.argv), 2, b"")
    return 0


if __name__ == "__main__":
    sys.exit(main())
