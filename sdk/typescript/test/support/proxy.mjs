// A loopback TCP proxy that can lose answers: armed with `dropNext()`, it forwards the next
// request to the server and closes the client's connection when the answer starts, so the
// request took effect but its answer never arrived.
import { connect, createServer } from "node:net";

export async function startDroppingProxy(targetUrl) {
  const target = new URL(targetUrl);
  let armed = 0;
  const stats = { connections: 0, dropped: 0 };
  const sockets = new Set();
  const server = createServer((client) => {
    stats.connections += 1;
    const upstream = connect(Number(target.port), target.hostname);
    sockets.add(client);
    sockets.add(upstream);
    client.on("close", () => sockets.delete(client));
    upstream.on("close", () => sockets.delete(upstream));
    client.on("error", () => upstream.destroy());
    upstream.on("error", () => client.destroy());
    let dropThis = false;
    client.on("data", (chunk) => {
      if (!dropThis && armed > 0) {
        armed -= 1;
        dropThis = true;
      }
      upstream.write(chunk);
    });
    upstream.on("data", (chunk) => {
      if (dropThis) {
        stats.dropped += 1;
        client.destroy();
        upstream.destroy();
        return;
      }
      client.write(chunk);
    });
    client.on("end", () => upstream.end());
    upstream.on("end", () => client.end());
  });
  await new Promise((r) => server.listen(0, "127.0.0.1", r));
  return {
    url: `http://127.0.0.1:${server.address().port}`,
    stats,
    /** Lose the answer to the next request. */
    dropNext(n = 1) {
      armed += n;
    },
    async close() {
      for (const s of sockets) s.destroy();
      await new Promise((r) => server.close(r));
    },
  };
}
