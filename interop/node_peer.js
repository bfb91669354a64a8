#!/usr/bin/env node
// permessage-deflate interop with Node's `ws`.
//
// usage: node_peer.js server PORT            echo server, perMessageDeflate on (threshold 0)
//        node_peer.js client URL [--takeover]
//            sends compressible messages, checks each echo, checks that permessage-deflate
//            was agreed and that both directions were compressed (bytes on the socket
//            against the payload); exits non-zero otherwise.
'use strict';
const path = require('path');
const { WebSocket, WebSocketServer } = require(process.env.WS_MODULE || path.join(__dirname, 'node_modules', 'ws'));

function jsonText(length, seed) {
  let s = '';
  for (let i = seed; s.length < length; i++) {
    s += `{"id":${i},"user":"user${i % 13}","text":"hello, world","ok":true},`;
  }
  return s.slice(0, length);
}

function fail(why) {
  console.error(`node_peer: FAILED: ${why}`);
  process.exit(1);
}

const [mode, target, ...rest] = process.argv.slice(2);
if (mode === 'server') {
  const wss = new WebSocketServer({ host: '127.0.0.1', port: Number(target), perMessageDeflate: { threshold: 0 }, maxPayload: 0 });
  wss.on('connection', (ws) => {
    ws.on('message', (data, isBinary) => ws.send(data, { binary: isBinary }));
  });
  wss.on('listening', () => console.log(`node_peer: ws echo on ws://127.0.0.1:${target}/`));
} else if (mode === 'client') {
  const takeover = rest.includes('--takeover');
  const perMessageDeflate = takeover
    ? { threshold: 0 }
    : { threshold: 0, serverNoContextTakeover: true, clientNoContextTakeover: true };
  const ws = new WebSocket(target, { perMessageDeflate, maxPayload: 0 });
  const sizes = [0, 20, 200, 1024, 5000, 70000, 300000, 1024, 1024];
  const queue = [];
  sizes.forEach((len, round) => {
    queue.push({ data: jsonText(len, round), binary: false });
    queue.push({ data: Buffer.from(jsonText(len, round + 100)), binary: true });
  });
  let total = 0;
  let at = 0;
  let wire0 = null;
  const next = () => {
    if (at === queue.length) {
      const read = ws._socket.bytesRead - wire0.read;
      const written = ws._socket.bytesWritten - wire0.written;
      console.log(`node_peer: ${total / 2} payload bytes each way; on the wire sent ${written}, received ${read}`);
      if (written * 3 > total / 2 || read * 3 > total / 2) fail('a direction was not compressed');
      ws.close(1000);
      return;
    }
    const m = queue[at];
    total += m.data.length;
    ws.send(m.data, { binary: m.binary });
  };
  ws.on('open', () => {
    console.log(`node_peer: agreed ${ws.extensions}`);
    if (!ws.extensions.includes('permessage-deflate')) fail('no deflate agreed');
    wire0 = { read: ws._socket.bytesRead, written: ws._socket.bytesWritten };
    next();
  });
  ws.on('message', (data, isBinary) => {
    const m = queue[at];
    const expected = m.binary ? m.data : Buffer.from(m.data);
    if (isBinary !== m.binary || !Buffer.from(data).equals(expected)) {
      fail(`message ${at} (${m.data.length} bytes) did not come back whole`);
    }
    total += data.length;
    at++;
    next();
  });
  ws.on('close', (code) => {
    if (at !== queue.length) fail(`closed early with ${code}`);
    console.log('node_peer: OK');
  });
  ws.on('error', (e) => fail(e.message));
} else {
  console.error('usage: node_peer.js server PORT | client URL [--takeover]');
  process.exit(2);
}
