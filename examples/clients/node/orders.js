// Producing and consuming through the Sluice sidecar with @grpc/grpc-js.
//
// The app talks to the sidecar on localhost (SLUICE_ADDR, set by the injection),
// with no broker address and no password. Like ../python/orders.py, this example:
// - enqueues --count orders, keyed by customer (one customer's orders stay in order);
// - consumes on one Subscribe stream until SIGTERM or SIGINT, as a consumer in a pod
//   does: credit for 16 deliveries at a time, acks sent inline on the stream, and a
//   nack with a delay for the first delivery of every tenth order (try again in a
//   while, as when a downstream call fails);
// - on the signal, ends the stream: what it held and did not settle goes back at once;
// - prints what happened as JSON.
//
// The .proto is loaded at run time (@grpc/proto-loader): SLUICE_PROTO names the
// directory holding sluice/v1/queues.proto. Setup: ../setup.sh.

const grpc = require("@grpc/grpc-js");
const loader = require("@grpc/proto-loader");
const path = require("path");

const CREDIT = 16;

function args() {
  const out = { addr: process.env.SLUICE_ADDR || "127.0.0.1:7070", queue: "orders", count: 100 };
  const argv = process.argv.slice(2);
  for (let i = 0; i < argv.length; i += 2) out[argv[i].replace(/^--/, "")] = argv[i + 1];
  out.count = Number(out.count);
  return out;
}

function call(client, method, request) {
  return new Promise((resolve, reject) =>
    client[method](request, (err, response) => (err ? reject(err) : resolve(response))),
  );
}

async function produce(client, queue, count) {
  for (let i = 0; i < count; i++) {
    await call(client, "Enqueue", {
      queue,
      message: {
        body: Buffer.from(`order-${i}`),
        key: `customer-${i % 3}`,
        attributes: { kind: "order" },
      },
    });
  }
}

// Consumes until SIGTERM or SIGINT, as a consumer in a pod does.
function consume(client, queue) {
  return new Promise((resolve, reject) => {
    let confirmed = 0;
    let nacked = 0;
    let redelivered = 0;
    const stream = client.Subscribe();
    let finished = false;
    const finish = () => {
      if (finished) return;
      finished = true;
      // Ending the stream gives back what it held and did not settle; cancel, so
      // as not to wait for the server to close its side.
      stream.end();
      stream.cancel();
      resolve({ acked: confirmed, nacked, redelivered });
    };
    for (const signal of ["SIGTERM", "SIGINT"]) process.once(signal, finish);
    stream.on("data", (resp) => {
      if (resp.response === "ack") {
        // The broker's answer to an inline ack: settled once it says OK (0).
        confirmed += resp.ack.results.filter((r) => r.code === 0).length;
        return;
      }
      if (resp.response !== "message") return; // the answers to nacks
      const m = resp.message;
      const i = Number(m.body.toString().split("-")[1]);
      if (m.delivery_count > 1) redelivered++;
      if (i % 10 === 0 && m.delivery_count === 1) {
        // Not now: back in the queue for 200 ms, then delivered again.
        stream.write({ nack: { queue, receipts: [m.receipt], delay_ms: 200 } });
        nacked++;
      } else {
        stream.write({ ack: { queue, receipts: [m.receipt] } });
      }
      stream.write({ credit: 1 });
    });
    stream.on("error", (err) => (err.code === grpc.status.CANCELLED ? finish() : reject(err)));
    stream.write({ start: { queue, initial_credit: CREDIT } });
  });
}

async function main() {
  const a = args();
  const root = process.env.SLUICE_PROTO || path.join(__dirname, "../../../proto");
  const def = loader.loadSync("sluice/v1/queues.proto", {
    includeDirs: [root],
    keepCase: true,
    longs: Number,
    defaults: true,
    oneofs: true,
  });
  const { Queues } = grpc.loadPackageDefinition(def).sluice.v1;
  const client = new Queues(a.addr, grpc.credentials.createInsecure());
  await produce(client, a.queue, a.count);
  const done = await consume(client, a.queue);
  const stats = await call(client, "Stats", { queue: a.queue });
  client.close();
  console.log(
    JSON.stringify({
      client: "node",
      sent: a.count,
      ...done,
      ready_after: stats.ready,
      in_flight_after: stats.in_flight,
    }),
  );
}

main().catch((err) => {
  console.error(err);
  process.exit(1);
});
