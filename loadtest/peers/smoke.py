#!/usr/bin/env python3
"""Stdlib-only WebSocket smoke client: checks that a server on 127.0.0.1 echoes.

    python3 loadtest/peers/smoke.py ws://127.0.0.1:PORT/
    python3 loadtest/peers/smoke.py --pubsub ws://127.0.0.1:PORT/   then the echo checks

Sends text, binary, a 1 MiB binary message, a fragmented message, and a ping; expects
each echoed byte for byte (and a pong carrying the ping's payload), then closes with 1000
and expects the close echoed. Exits non-zero with a message on the first mismatch.

With --pubsub (for the pub/sub servers, where one client alone on a topic gets its own
messages back, so the echo checks hold too) it first checks topics: what a client sends
reaches every client on its path, itself included, and no client on another path.
"""
import base64
import os
import socket
import struct
import sys
import urllib.parse


def frame(opcode, payload, fin=True):
    mask = os.urandom(4)
    head = bytes([(0x80 if fin else 0) | opcode])
    n = len(payload)
    if n < 126:
        head += bytes([0x80 | n])
    elif n < 65536:
        head += bytes([0x80 | 126]) + struct.pack("!H", n)
    else:
        head += bytes([0x80 | 127]) + struct.pack("!Q", n)
    masked = bytes(b ^ mask[i & 3] for i, b in enumerate(payload)) if n < 4096 else \
        (int.from_bytes(payload, "big") ^ int.from_bytes((mask * (n // 4 + 1))[:n], "big")).to_bytes(n, "big")
    return head + mask + masked


class Conn:
    def __init__(self, url):
        u = urllib.parse.urlparse(url)
        host, port = u.hostname, u.port or 80
        if host not in ("127.0.0.1", "localhost"):
            sys.exit("smoke.py only talks to 127.0.0.1")
        self.sock = socket.create_connection((host, port), timeout=10)
        key = base64.b64encode(os.urandom(16)).decode()
        req = (f"GET {u.path or '/'} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
               f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n")
        self.sock.sendall(req.encode())
        self.buf = b""
        while b"\r\n\r\n" not in self.buf:
            chunk = self.sock.recv(4096)
            if not chunk:
                sys.exit("connection closed during handshake")
            self.buf += chunk
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        if not head.startswith(b"HTTP/1.1 101"):
            sys.exit(f"handshake refused: {head[:200]!r}")

    def read(self, n):
        while len(self.buf) < n:
            chunk = self.sock.recv(1 << 20)
            if not chunk:
                raise EOFError("connection closed")
            self.buf += chunk
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def recv_message(self):
        """Returns (opcode, payload) of the next whole message or control frame."""
        opcode, parts = None, []
        while True:
            b0, b1 = self.read(2)
            n = b1 & 0x7F
            if b1 & 0x80:
                sys.exit("server sent a masked frame")
            if n == 126:
                n = struct.unpack("!H", self.read(2))[0]
            elif n == 127:
                n = struct.unpack("!Q", self.read(8))[0]
            payload = self.read(n)
            op = b0 & 0x0F
            if op >= 8:
                return op, payload
            if op != 0:
                opcode = op
            parts.append(payload)
            if b0 & 0x80:
                return opcode, b"".join(parts)


def pubsub(url):
    """Topics: two clients on TOPIC/a, one on TOPIC/b; what one sends reaches both on /a (the
    sender included) with its opcode, and not /b."""
    base = url.rstrip("/")
    a1, a2, b = Conn(base + "/a"), Conn(base + "/a"), Conn(base + "/b")
    a1.sock.sendall(frame(1, b"to a"))
    a2.sock.sendall(frame(2, b"\x00binary to a"))
    b.sock.sendall(frame(1, b"to b"))
    for name, c in (("a1", a1), ("a2", a2)):
        got = sorted([c.recv_message(), c.recv_message()])
        if got != [(1, b"to a"), (2, b"\x00binary to a")]:
            sys.exit(f"pubsub: {name} got {got!r}")
    if b.recv_message() != (1, b"to b"):
        sys.exit("pubsub: b did not get its own message")
    b.sock.settimeout(0.3)
    try:
        extra = b.recv_message()
        sys.exit(f"pubsub: b got a message of another topic: {extra!r}")
    except (socket.timeout, TimeoutError):
        pass
    for c in (a1, a2, b):
        c.sock.close()
    print(f"ok: {url} publishes per topic, to every subscriber and the sender, opcodes kept")


def main():
    args = sys.argv[1:]
    if args[:1] == ["--pubsub"]:
        args = args[1:]
        pubsub(args[0] if args else "ws://127.0.0.1:9002/")
    url = args[0] if args else "ws://127.0.0.1:9001/"
    c = Conn(url)
    checks = [
        ("text", 1, "héllo wörld".encode()),
        ("binary", 2, bytes(range(256))),
        ("empty", 2, b""),
        ("64 KiB", 2, os.urandom(65536)),
        ("1 MiB", 2, os.urandom(1 << 20)),
    ]
    for name, op, payload in checks:
        c.sock.sendall(frame(op, payload))
        got = c.recv_message()
        if got != (op, payload):
            sys.exit(f"{name}: echo mismatch (opcode {got[0]}, {len(got[1])} bytes)")
    c.sock.sendall(frame(1, b"frag", fin=False) + frame(0, b"men", fin=False) + frame(0, b"ted"))
    if c.recv_message() != (1, b"fragmented"):
        sys.exit("fragmented: echo mismatch")
    c.sock.sendall(frame(9, b"ping!"))
    if c.recv_message() != (10, b"ping!"):
        sys.exit("ping: no matching pong")
    c.sock.sendall(frame(8, struct.pack("!H", 1000)))
    op, payload = c.recv_message()
    if op != 8 or payload[:2] != struct.pack("!H", 1000):
        sys.exit(f"close: got opcode {op} payload {payload[:8]!r}")
    print(f"ok: {url} echoes text, binary, 1 MiB, fragments, ping and close")


if __name__ == "__main__":
    main()
