//! A delaying TCP proxy: a volunteer's network link, on loopback.
//!
//! The kernel's netem qdisc is not available on every machine (and needs
//! root), so the fleet emulator puts this proxy between each volunteer and
//! the server. Every chunk read from one side is held for a one-way delay
//! plus uniform jitter before it is written to the other, in each
//! direction. A chunk is never released before the chunk read ahead of it,
//! so order within a connection is preserved the way TCP preserves it: a
//! late chunk holds back the ones behind it.
//!
//! It is plain TCP, so anything can go through it: the worker's WebSocket,
//! or a browser tab's page load and WebSocket alike. What it does not model:
//! bandwidth (loopback moves the bytes at once) and loss, and a connection's
//! set-up costs one round trip less than on a real link (the proxy's own
//! accept answers the TCP handshake at once; the WebSocket upgrade that
//! follows does pay its round trip).

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio::time::Instant;

/// Bytes read at most per chunk.
const CHUNK: usize = 16 * 1024;

/// Chunks held at most per direction (at most 4 MiB): past that the proxy
/// stops reading, and TCP's own flow control holds the sender back.
const HELD: usize = 256;

/// What one direction of a link adds to every chunk.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Link {
    /// The one-way delay: half the round trip.
    pub delay: Duration,
    /// Each chunk's delay is uniform in `delay ± jitter` (never below 0).
    pub jitter: Duration,
}

impl Link {
    /// A link whose round trip is `rtt`, give or take `jitter` (each
    /// direction is `rtt / 2 ± jitter / 2`).
    pub fn from_rtt(rtt: Duration, jitter: Duration) -> Self {
        Self {
            delay: rtt / 2,
            jitter: jitter / 2,
        }
    }

    /// One chunk's delay.
    fn sample(&self, rng: &mut fastrand::Rng) -> Duration {
        let lo = self.delay.saturating_sub(self.jitter);
        let hi = self.delay + self.jitter;
        let span = (hi - lo).as_nanos() as u64;
        lo + Duration::from_nanos(if span == 0 { 0 } else { rng.u64(0..=span) })
    }
}

/// One listener on 127.0.0.1 whose connections are forwarded, delayed, to
/// `upstream`. Dropping it closes the listener and every connection through
/// it (a volunteer that leaves takes its link with it).
#[derive(Debug)]
pub struct Proxy {
    addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    /// Listens on a free loopback port. `seed` roots the jitter of every
    /// connection through this proxy, so a run's delays can be replayed.
    pub async fn start(upstream: SocketAddr, link: Link, seed: u64) -> io::Result<Proxy> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let task = tokio::spawn(accept(listener, upstream, link, seed));
        Ok(Proxy { addr, task })
    }

    /// Where volunteers connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        // The accept task owns the connections' JoinSet: aborting it drops
        // the set, which aborts every connection.
        self.task.abort();
    }
}

async fn accept(listener: TcpListener, upstream: SocketAddr, link: Link, seed: u64) {
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((inbound, _)) => {
                    connections.spawn(connection(inbound, upstream, link, rng.u64(..)));
                }
                // Out of descriptors, say: wait rather than spin.
                Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            },
            // Reap finished connections so the set does not grow.
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}

/// Forwards one connection both ways until both directions end.
async fn connection(inbound: TcpStream, upstream: SocketAddr, link: Link, seed: u64) {
    let Ok(outbound) = TcpStream::connect(upstream).await else {
        return; // dropping `inbound` tells the volunteer
    };
    // Each chunk is written when due: Nagle's algorithm would hold small
    // ones back for an ACK and add a delay nobody asked for.
    let _ = inbound.set_nodelay(true);
    let _ = outbound.set_nodelay(true);
    let (in_read, in_write) = inbound.into_split();
    let (out_read, out_write) = outbound.into_split();
    let mut rng = fastrand::Rng::with_seed(seed);
    let (up, down) = (rng.fork(), rng.fork());
    // When one direction ends its halves are dropped, which shuts the
    // write side down: the other end sees the close and ends the other.
    tokio::join!(
        pipe(in_read, out_write, link, up),
        pipe(out_read, in_write, link, down)
    );
}

/// One direction: a reader that stamps each chunk with its release time,
/// and a writer that releases them in order. End of stream is forwarded
/// (after the chunks before it) as a shutdown of the write side.
async fn pipe(mut from: OwnedReadHalf, mut to: OwnedWriteHalf, link: Link, mut rng: fastrand::Rng) {
    let (tx, mut rx) = mpsc::channel::<(Instant, Vec<u8>)>(HELD);
    let read = async move {
        let mut buf = vec![0; CHUNK];
        let mut last = Instant::now();
        loop {
            let n = match from.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            let due = (Instant::now() + link.sample(&mut rng)).max(last);
            last = due;
            if tx.send((due, buf[..n].to_vec())).await.is_err() {
                break;
            }
        }
    };
    let write = async move {
        while let Some((due, chunk)) = rx.recv().await {
            tokio::time::sleep_until(due).await;
            if to.write_all(&chunk).await.is_err() {
                return;
            }
        }
        let _ = to.shutdown().await;
    };
    tokio::join!(read, write);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An upstream that echoes every connection until its end of stream.
    async fn echo() -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let (mut r, mut w) = s.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                    let _ = w.shutdown().await;
                });
            }
        });
        addr
    }

    #[tokio::test]
    async fn bytes_arrive_intact_and_in_order() {
        let link = Link {
            delay: Duration::from_millis(5),
            jitter: Duration::from_millis(5),
        };
        let proxy = Proxy::start(echo().await, link, 7).await.unwrap();
        let stream = TcpStream::connect(proxy.addr()).await.unwrap();
        let (mut r, mut w) = stream.into_split();
        let sent: Vec<u8> = (0..1_000_003u32).map(|i| (i * 31 + i / 251) as u8).collect();
        let data = sent.clone();
        let writer = tokio::spawn(async move {
            // Writes of every size, so chunks are cut everywhere and the
            // jitter reorders their due times.
            let mut rng = fastrand::Rng::with_seed(1);
            let mut rest = &data[..];
            while !rest.is_empty() {
                let n = rng.usize(1..=40_000).min(rest.len());
                w.write_all(&rest[..n]).await.unwrap();
                rest = &rest[n..];
            }
            w.shutdown().await.unwrap();
        });
        let mut got = Vec::new();
        // Ends only if the end of stream went through both ways.
        r.read_to_end(&mut got).await.unwrap();
        writer.await.unwrap();
        assert!(got == sent, "{} bytes back of {}", got.len(), sent.len());
    }

    #[tokio::test]
    async fn nothing_arrives_before_its_delay() {
        for (delay, jitter) in [(40, 0), (60, 20)] {
            let link = Link {
                delay: Duration::from_millis(delay),
                jitter: Duration::from_millis(jitter),
            };
            let floor = link.delay - link.jitter;
            // Upstream: note when the first byte arrives, then echo it.
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let upstream = listener.local_addr().unwrap();
            let arrived = tokio::spawn(async move {
                let (mut s, _) = listener.accept().await.unwrap();
                let mut byte = [0; 1];
                s.read_exact(&mut byte).await.unwrap();
                let at = Instant::now();
                s.write_all(&byte).await.unwrap();
                at
            });
            let proxy = Proxy::start(upstream, link, 3).await.unwrap();
            let mut s = TcpStream::connect(proxy.addr()).await.unwrap();
            let sent = Instant::now();
            s.write_all(b"x").await.unwrap();
            let mut back = [0; 1];
            s.read_exact(&mut back).await.unwrap();
            let round_trip = sent.elapsed();
            let one_way = arrived.await.unwrap() - sent;
            assert_eq!(&back, b"x");
            assert!(one_way >= floor, "{one_way:?} one way, at least {floor:?}");
            assert!(round_trip >= 2 * floor, "{round_trip:?} round trip");
        }
    }

    #[test]
    fn delays_stay_within_the_jitter() {
        let link = Link::from_rtt(Duration::from_millis(150), Duration::from_millis(50));
        assert_eq!(link.delay, Duration::from_millis(75));
        assert_eq!(link.jitter, Duration::from_millis(25));
        let mut rng = fastrand::Rng::with_seed(9);
        let samples: Vec<Duration> = (0..10_000).map(|_| link.sample(&mut rng)).collect();
        let (lo, hi) = (Duration::from_millis(50), Duration::from_millis(100));
        assert!(samples.iter().all(|d| (lo..=hi).contains(d)));
        let mean = samples.iter().sum::<Duration>() / samples.len() as u32;
        assert!(mean.abs_diff(link.delay) < Duration::from_millis(1), "{mean:?}");
        // More jitter than delay: clamped at zero, never negative.
        let wide = Link {
            delay: Duration::from_millis(1),
            jitter: Duration::from_millis(5),
        };
        assert!((0..1000).all(|_| wide.sample(&mut rng) <= Duration::from_millis(6)));
        let none = Link::from_rtt(Duration::ZERO, Duration::ZERO);
        assert_eq!(none.sample(&mut rng), Duration::ZERO);
    }
}
