"""Producing and consuming through the Sluice sidecar with grpcio.

The app talks to the sidecar on localhost (SLUICE_ADDR, set by the injection), with
no broker address and no password. This example:

- enqueues --count orders, keyed by customer (one customer's orders stay in order);
- consumes on one Subscribe stream until SIGTERM or SIGINT, as a consumer in a pod
  does: credit for 16 deliveries at a time, acks sent inline on the stream, and a
  nack with a delay for the first delivery of every tenth order (as an app does when
  a downstream call fails: try again in a while);
- on the signal, closes the stream: deliveries it held but did not settle go back
  to the queue at once;
- prints what happened as JSON.

Setup (a venv with grpcio and the stubs generated from proto/): see ../setup.sh.
"""

import argparse
import json
import os
import queue
import signal
import threading

import grpc
from sluice.v1 import queues_pb2 as pb
from sluice.v1 import queues_pb2_grpc as rpc

CREDIT = 16


def produce(stub, queue_name, count):
    for i in range(count):
        stub.Enqueue(
            pb.EnqueueRequest(
                queue=queue_name,
                message=pb.NewMessage(
                    body=f"order-{i}".encode(),
                    key=f"customer-{i % 3}",
                    attributes={"kind": "order"},
                ),
            )
        )


def consume(stub, queue_name, stop):
    """Subscribes until `stop` is set (SIGTERM or SIGINT), as a consumer in a pod does."""
    requests = queue.Queue()
    requests.put(
        pb.SubscribeRequest(start=pb.SubscribeStart(queue=queue_name, initial_credit=CREDIT))
    )

    def outgoing():
        while True:
            r = requests.get()
            if r is None:  # closing the stream hands back unsettled deliveries
                return
            yield r

    stream = stub.Subscribe(outgoing())
    stop_watch = threading.Thread(
        target=lambda: (stop.wait(), requests.put(None), stream.cancel()), daemon=True
    )
    stop_watch.start()
    nacked, redelivered, confirmed = 0, 0, 0
    try:
        for resp in stream:
            kind = resp.WhichOneof("response")
            if kind == "ack":
                # The broker's answer to an inline ack: settled once it says OK (0).
                confirmed += sum(1 for r in resp.ack.results if r.code == 0)
                continue
            if kind != "message":
                continue  # the answers to nacks
            m = resp.message
            i = int(m.body.decode().split("-")[1])
            if m.delivery_count > 1:
                redelivered += 1
            if i % 10 == 0 and m.delivery_count == 1:
                # Not now: back in the queue for 200 ms, then delivered again.
                requests.put(
                    pb.SubscribeRequest(
                        nack=pb.NackRequest(queue=queue_name, receipts=[m.receipt], delay_ms=200)
                    )
                )
                nacked += 1
            else:
                requests.put(
                    pb.SubscribeRequest(ack=pb.AckRequest(queue=queue_name, receipts=[m.receipt]))
                )
            requests.put(pb.SubscribeRequest(credit=1))
    except grpc.RpcError as e:
        if e.code() != grpc.StatusCode.CANCELLED:
            raise
    requests.put(None)
    return confirmed, nacked, redelivered


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--addr", default=os.environ.get("SLUICE_ADDR", "127.0.0.1:7070"))
    p.add_argument("--queue", default="orders")
    p.add_argument("--count", type=int, default=100)
    args = p.parse_args()

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())

    with grpc.insecure_channel(args.addr) as channel:
        stub = rpc.QueuesStub(channel)
        produce(stub, args.queue, args.count)
        acked, nacked, redelivered = consume(stub, args.queue, stop)
        stats = stub.Stats(pb.StatsRequest(queue=args.queue))
    print(
        json.dumps(
            {
                "client": "python",
                "sent": args.count,
                "acked": acked,
                "nacked": nacked,
                "redelivered": redelivered,
                "ready_after": stats.ready,
                "in_flight_after": stats.in_flight,
            }
        )
    )


if __name__ == "__main__":
    main()
