//! The two measurements: closed-loop end-to-end throughput, and open-loop latency at
//! a fixed offered rate (corrected for coordinated omission).

use crate::proc::{self, Usage};
use crate::system::{ConsumerMode, ProducerStyle, System};
use anyhow::{Context, Result, bail};
use bytes::{BufMut, Bytes, BytesMut};
use hdrhistogram::Histogram;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::task::JoinSet;

/// How long a consumer waits for a message before looking at the stop flag again.
const POLL: Duration = Duration::from_millis(100);
/// How long tasks get to finish once told to stop.
const STOP_GRACE: Duration = Duration::from_secs(10);

/// A message body: the send (or scheduled send) time in nanoseconds since `base`,
/// a flag saying whether the latency run counts it, then padding up to `size`.
fn body(base: Instant, at: Instant, measured: bool, size: usize) -> Bytes {
    let mut b = BytesMut::with_capacity(size.max(9));
    b.put_u64_le(at.saturating_duration_since(base).as_nanos() as u64);
    b.put_u8(u8::from(measured));
    b.resize(size.max(9), b'x');
    b.freeze()
}

fn stamp_of(body: &[u8]) -> Option<(u64, bool)> {
    let nanos = u64::from_le_bytes(body.get(..8)?.try_into().ok()?);
    Some((nanos, *body.get(8)? == 1))
}

#[derive(Debug, Clone)]
pub struct ThroughputResult {
    pub system: String,
    pub mode: ConsumerMode,
    pub style: ProducerStyle,
    pub concurrency: usize,
    pub enqueued_per_sec: f64,
    pub acked_per_sec: f64,
    pub mb_per_sec: f64,
    pub ack_failed: u64,
    pub size: usize,
    pub round: usize,
    /// CPU time of the server processes (broker, sidecar) per acked message, µs.
    pub server_cpu_us: f64,
    /// CPU time of the benchmark's own clients per acked message, µs.
    pub client_cpu_us: f64,
}

fn cpu_of(groups: &[(String, u32)]) -> Duration {
    groups.iter().map(|(_, g)| proc::group_usage(*g).cpu).sum()
}

/// N producers enqueue back to back, N consumers take and ack, for `warmup` and then
/// `duration`; what counts is acks the server confirmed within `duration`. Then the
/// producers stop and the consumers drain what is left (up to `drain`), so the next
/// run on the queue starts from an empty queue.
#[allow(clippy::too_many_arguments)]
pub async fn throughput(
    system: &dyn System,
    queue: &str,
    mode: ConsumerMode,
    style: ProducerStyle,
    concurrency: usize,
    warmup: Duration,
    duration: Duration,
    drain: Duration,
    size: usize,
    round: usize,
) -> Result<ThroughputResult> {
    let base = Instant::now();
    let groups = system.processes();
    let stop = Arc::new(AtomicBool::new(false));
    let stop_producers = Arc::new(AtomicBool::new(false));
    let enqueued = Arc::new(AtomicU64::new(0));
    let acked = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let mut tasks: JoinSet<Result<()>> = JoinSet::new();
    for _ in 0..concurrency {
        let mut consumer = system.consumer(queue, mode).await?;
        let (stop, acked, failed) = (stop.clone(), acked.clone(), failed.clone());
        let producers_done = stop_producers.clone();
        tasks.spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let b = consumer.next(POLL).await?;
                acked.fetch_add(b.acked, Ordering::Relaxed);
                failed.fetch_add(b.ack_failed, Ordering::Relaxed);
                if producers_done.load(Ordering::Relaxed) && b.delivered.is_empty() {
                    // Drained: one last call acks what the previous one delivered.
                    let b = consumer.next(Duration::ZERO).await?;
                    acked.fetch_add(b.acked, Ordering::Relaxed);
                    break;
                }
            }
            Ok(())
        });
    }
    for _ in 0..concurrency {
        let producer = system.producer(queue).await?;
        let (senders, batch) = match style {
            ProducerStyle::One => (1, 0),
            ProducerStyle::Window(w) => (w, 0),
            ProducerStyle::Batch(b) => (1, b as usize),
        };
        // A window is that many sends in flight at once on the producer's connection.
        for _ in 0..senders {
            let producer = producer.clone();
            let (stop, enqueued) = (stop_producers.clone(), enqueued.clone());
            tasks.spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    if batch == 0 {
                        producer
                            .send(body(base, Instant::now(), false, size))
                            .await?;
                        enqueued.fetch_add(1, Ordering::Relaxed);
                    } else {
                        let now = Instant::now();
                        let bodies = (0..batch).map(|_| body(base, now, false, size)).collect();
                        producer.send_many(bodies).await?;
                        enqueued.fetch_add(batch as u64, Ordering::Relaxed);
                    }
                }
                Ok(())
            });
        }
    }
    let watch = async {
        tokio::time::sleep(warmup).await;
        let (e0, a0, t0) = (
            enqueued.load(Ordering::Relaxed),
            acked.load(Ordering::Relaxed),
            Instant::now(),
        );
        let (s0, c0) = (cpu_of(&groups), proc::self_cpu());
        tokio::time::sleep(duration).await;
        let (e1, a1, t1) = (
            enqueued.load(Ordering::Relaxed),
            acked.load(Ordering::Relaxed),
            Instant::now(),
        );
        let (s1, c1) = (cpu_of(&groups), proc::self_cpu());
        (
            e1 - e0,
            a1 - a0,
            (t1 - t0).as_secs_f64(),
            s1.saturating_sub(s0),
            c1.saturating_sub(c0),
        )
    };
    // A task failing early ends the run at once.
    let (enq, ack, secs, server_cpu, client_cpu) = tokio::select! {
        r = watch => r,
        Some(joined) = tasks.join_next() => {
            stop.store(true, Ordering::Relaxed);
            joined.context("bench task panicked")??;
            bail!("a bench task ended before the run did");
        }
    };
    stop_producers.store(true, Ordering::Relaxed);
    let stopper = {
        let stop = stop.clone();
        tokio::spawn(async move {
            tokio::time::sleep(drain).await;
            stop.store(true, Ordering::Relaxed);
        })
    };
    let finished = finish(tasks, drain + STOP_GRACE).await;
    stopper.abort();
    finished?;
    let per_msg = |d: Duration| d.as_secs_f64() * 1e6 / (ack.max(1) as f64);
    Ok(ThroughputResult {
        system: system.name().to_string(),
        mode,
        style,
        concurrency,
        enqueued_per_sec: enq as f64 / secs,
        acked_per_sec: ack as f64 / secs,
        mb_per_sec: ack as f64 * size as f64 / secs / 1e6,
        ack_failed: failed.load(Ordering::Relaxed),
        size,
        round,
        server_cpu_us: per_msg(server_cpu),
        client_cpu_us: per_msg(client_cpu),
    })
}

async fn finish(mut tasks: JoinSet<Result<()>>, grace: Duration) -> Result<()> {
    let all = async {
        while let Some(joined) = tasks.join_next().await {
            joined.context("bench task panicked")??;
        }
        Ok::<_, anyhow::Error>(())
    };
    match tokio::time::timeout(grace, all).await {
        Ok(r) => r,
        Err(_) => bail!("bench tasks did not stop within {grace:?}"),
    }
}

#[derive(Debug, Clone)]
pub struct LatencyResult {
    pub system: String,
    pub mode: ConsumerMode,
    pub rate: f64,
    /// Producer connections and consumers.
    pub clients: usize,
    pub round: usize,
    pub seconds: f64,
    pub scheduled: u64,
    pub delivered: u64,
    pub send_errors: u64,
    /// Microseconds.
    pub p50: u64,
    pub p99: u64,
    pub p999: u64,
    pub max: u64,
    /// Enqueue confirmation (scheduled send → durable ack to the producer), microseconds.
    pub enqueue_p50: u64,
    pub enqueue_p99: u64,
}

/// Open loop: message i is due at `start + i / rate` whatever happened to earlier
/// ones (each send is its own task), and its latency runs from that scheduled time to
/// its delivery to a consumer, so a stall delays the clock of every message scheduled
/// during it (no coordinated omission). Messages scheduled in the warmup are sent
/// but not counted.
#[allow(clippy::too_many_arguments)]
pub async fn latency(
    system: &dyn System,
    queue: &str,
    mode: ConsumerMode,
    rate: f64,
    producers: usize,
    consumers: usize,
    warmup: Duration,
    duration: Duration,
    drain: Duration,
    size: usize,
    round: usize,
) -> Result<LatencyResult> {
    if rate <= 0.0 {
        bail!("--rate must be above 0");
    }
    let base = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let received = Arc::new(AtomicU64::new(0));
    let mut readers: JoinSet<Result<Histogram<u64>>> = JoinSet::new();
    for _ in 0..consumers.max(1) {
        let mut consumer = system.consumer(queue, mode).await?;
        let (stop, received) = (stop.clone(), received.clone());
        readers.spawn(async move {
            let mut hist = Histogram::<u64>::new_with_bounds(1, 3_600_000_000, 3)?;
            while !stop.load(Ordering::Relaxed) {
                let b = consumer.next(Duration::from_millis(200)).await?;
                for (at, body) in b.delivered {
                    if let Some((sched, true)) = stamp_of(&body) {
                        let lat = at.saturating_duration_since(base).as_nanos() as u64;
                        hist.saturating_record((lat.saturating_sub(sched) / 1000).max(1));
                        received.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            // Ack the last deliveries.
            let _ = consumer.next(Duration::ZERO).await;
            Ok(hist)
        });
    }
    let mut pool = Vec::new();
    for _ in 0..producers.max(1) {
        pool.push(system.producer(queue).await?);
    }
    let interval = Duration::from_secs_f64(1.0 / rate);
    let warm_n = (warmup.as_secs_f64() * rate).round() as u64;
    let total = warm_n + (duration.as_secs_f64() * rate).round() as u64;
    let errors = Arc::new(AtomicU64::new(0));
    let confirm = Arc::new(std::sync::Mutex::new(Histogram::<u64>::new_with_bounds(
        1,
        3_600_000_000,
        3,
    )?));
    let start = Instant::now() + Duration::from_millis(20);
    let mut sends: JoinSet<()> = JoinSet::new();
    for i in 0..total {
        let due = start + interval.mul_f64(i as f64);
        tokio::time::sleep_until(due.into()).await;
        let producer = pool[i as usize % pool.len()].clone();
        let (errors, confirm) = (errors.clone(), confirm.clone());
        let measured = i >= warm_n;
        let b = body(base, due, measured, size);
        sends.spawn(async move {
            match producer.send(b).await {
                Ok(()) if measured => {
                    let us = due.elapsed().as_micros() as u64;
                    confirm.lock().unwrap().saturating_record(us.max(1));
                }
                Ok(()) => {}
                Err(_) => {
                    errors.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
        // Reap finished sends so the set stays small.
        while sends.try_join_next().is_some() {}
    }
    while sends.join_next().await.is_some() {}
    let scheduled = total - warm_n;
    let expect = scheduled.saturating_sub(errors.load(Ordering::Relaxed));
    let deadline = Instant::now() + drain;
    while received.load(Ordering::Relaxed) < expect && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    stop.store(true, Ordering::Relaxed);
    let mut hist = Histogram::<u64>::new_with_bounds(1, 3_600_000_000, 3)?;
    let collect = async {
        while let Some(joined) = readers.join_next().await {
            hist.add(joined.context("consumer panicked")??)?;
        }
        Ok::<_, anyhow::Error>(())
    };
    tokio::time::timeout(STOP_GRACE, collect)
        .await
        .context("consumers did not stop")??;
    let confirm = confirm.lock().unwrap().clone();
    Ok(LatencyResult {
        system: system.name().to_string(),
        mode,
        rate,
        clients: producers.max(1),
        round,
        seconds: duration.as_secs_f64(),
        scheduled,
        delivered: hist.len(),
        send_errors: errors.load(Ordering::Relaxed),
        p50: hist.value_at_quantile(0.50),
        p99: hist.value_at_quantile(0.99),
        p999: hist.value_at_quantile(0.999),
        max: hist.max(),
        enqueue_p50: confirm.value_at_quantile(0.50),
        enqueue_p99: confirm.value_at_quantile(0.99),
    })
}

/// Memory of one server process group.
#[derive(Debug, Clone)]
pub struct ProcessMemory {
    pub role: String,
    pub usage: Usage,
}

pub fn memory_of(system: &dyn System) -> Vec<ProcessMemory> {
    system
        .processes()
        .into_iter()
        .map(|(role, g)| ProcessMemory {
            role,
            usage: proc::group_usage(g),
        })
        .collect()
}

#[derive(Debug, Clone)]
pub struct BacklogResult {
    pub system: String,
    pub messages: u64,
    pub size: usize,
    pub fill_secs: f64,
    /// After the backlog was written (peak = VmHWM since the process started).
    pub filled: Vec<ProcessMemory>,
    /// From the broker's restart (SIGKILL, then start) to one message served.
    pub recovery: Duration,
    /// The restarted broker once it served (its peak includes replaying the log).
    pub recovered: Vec<ProcessMemory>,
}

/// Writes `messages` messages into `queue` (pipelined batches from `producers`
/// connections), reads the servers' memory, then restarts the broker on that log and
/// times it until it serves.
pub async fn backlog(
    system: &mut dyn System,
    queue: &str,
    messages: u64,
    size: usize,
    producers: usize,
    batch: usize,
) -> Result<BacklogResult> {
    let base = Instant::now();
    let left = Arc::new(AtomicU64::new(messages));
    let mut tasks: JoinSet<Result<()>> = JoinSet::new();
    let started = Instant::now();
    for _ in 0..producers.max(1) {
        let producer = system.producer(queue).await?;
        let left = left.clone();
        tasks.spawn(async move {
            loop {
                let take = left
                    .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |l| {
                        l.checked_sub(1).map(|_| l.saturating_sub(batch as u64))
                    })
                    .map(|prev| prev.min(batch as u64));
                let Ok(n) = take else { break };
                let bodies = (0..n)
                    .map(|_| body(base, Instant::now(), false, size))
                    .collect();
                producer.send_many(bodies).await?;
            }
            Ok(())
        });
    }
    while let Some(joined) = tasks.join_next().await {
        joined.context("backlog producer panicked")??;
    }
    let fill_secs = started.elapsed().as_secs_f64();
    let filled = memory_of(system);
    let recovery = system.restart(queue).await?;
    let recovered = memory_of(system);
    Ok(BacklogResult {
        system: system.name().to_string(),
        messages,
        size,
        fill_secs,
        filled,
        recovery,
        recovered,
    })
}
