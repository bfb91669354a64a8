#!/usr/bin/env python3
"""permessage-deflate interop with Python `websockets` (the asyncio API).

usage: py_peer.py server PORT          echo server, deflate on (the library's default)
       py_peer.py client URL [--takeover]
           sends compressible messages, checks each echo, checks that permessage-deflate
           was agreed and that frames were compressed both ways (RSV1 counted on the
           frames encoded and decoded by the extension); exits non-zero otherwise.
"""
import asyncio
import sys

import websockets
from websockets.asyncio.client import connect
from websockets.asyncio.server import serve
from websockets.extensions import permessage_deflate as pmd

counts = {"sent_compressed": 0, "received_compressed": 0}
_encode, _decode = pmd.PerMessageDeflate.encode, pmd.PerMessageDeflate.decode


def encode(self, frame):
    out = _encode(self, frame)
    counts["sent_compressed"] += out.rsv1
    return out


def decode(self, frame, *args, **kwargs):
    counts["received_compressed"] += frame.rsv1
    return _decode(self, frame, *args, **kwargs)


pmd.PerMessageDeflate.encode, pmd.PerMessageDeflate.decode = encode, decode


def json_text(length, seed):
    parts, i, size = [], seed, 0
    while size < length:
        part = '{"id":%d,"user":"user%d","text":"hello, world","ok":true},' % (i, i % 13)
        parts.append(part)
        size += len(part)
        i += 1
    return "".join(parts)[:length]


async def echo(ws):
    async for message in ws:
        await ws.send(message)


async def server(port):
    async with serve(echo, "127.0.0.1", port, max_size=None, compression="deflate") as s:
        print(f"py_peer: websockets {websockets.__version__} echo on ws://127.0.0.1:{port}/", flush=True)
        await s.serve_forever()


async def client(url, takeover):
    if takeover:
        factories = [pmd.ClientPerMessageDeflateFactory(client_max_window_bits=True)]
    else:
        factories = [pmd.ClientPerMessageDeflateFactory(
            server_no_context_takeover=True, client_no_context_takeover=True,
            client_max_window_bits=True)]
    async with connect(url, extensions=factories, compression=None, max_size=None) as ws:
        agreed = ws.response.headers.get("Sec-WebSocket-Extensions")
        assert agreed and "permessage-deflate" in agreed, f"no deflate agreed: {agreed!r}"
        print(f"py_peer: agreed {agreed}")
        total = 0
        for rnd, length in enumerate([0, 20, 200, 1024, 5000, 70000, 300000, 1024, 1024]):
            text = json_text(length, rnd)
            await ws.send(text)
            back = await ws.recv()
            assert back == text, f"text of {length} bytes came back as {len(back)}"
            data = json_text(length, rnd + 100).encode()
            await ws.send(data)
            back = await ws.recv()
            assert back == data, f"binary of {length} bytes did not come back whole"
            total += 2 * length
    print(f"py_peer: {total} payload bytes each way; compressed frames sent "
          f"{counts['sent_compressed']}, received {counts['received_compressed']}")
    assert counts["sent_compressed"] >= 8, "the client did not compress"
    assert counts["received_compressed"] >= 8, "the server did not compress"
    print("py_peer: OK")


if __name__ == "__main__":
    if len(sys.argv) >= 3 and sys.argv[1] == "server":
        asyncio.run(server(int(sys.argv[2])))
    elif len(sys.argv) >= 3 and sys.argv[1] == "client":
        asyncio.run(client(sys.argv[2], "--takeover" in sys.argv[3:]))
    else:
        sys.exit(__doc__)
