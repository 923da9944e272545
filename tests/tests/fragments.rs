//! The frames a large message leaves in, which bound each connection's
//! write buffer. In a file of its own: its RW-256 server would swell the
//! memory the slow-reader test in `limits.rs` measures.

use std::sync::{Arc, Mutex};

use seedling_tests::*;

/// A TCP proxy to `upstream` that keeps a copy of everything the server
/// sends, before passing it on.
async fn recording_proxy(upstream: std::net::SocketAddr) -> (std::net::SocketAddr, Arc<Mutex<Vec<u8>>>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let kept = seen.clone();
    tokio::spawn(async move {
        let (client, _) = listener.accept().await.unwrap();
        let server = tokio::net::TcpStream::connect(upstream).await.unwrap();
        let (mut cr, mut cw) = client.into_split();
        let (mut sr, mut sw) = server.into_split();
        let down = async {
            let mut buf = vec![0u8; 1 << 16];
            while let Ok(n @ 1..) = sr.read(&mut buf).await {
                kept.lock().unwrap().extend_from_slice(&buf[..n]);
                if cw.write_all(&buf[..n]).await.is_err() {
                    break;
                }
            }
        };
        tokio::select! {
            _ = tokio::io::copy(&mut cr, &mut sw) => {}
            _ = down => {}
        }
    });
    (addr, seen)
}

/// The complete server frames in `wire` (unmasked, RFC 6455 section 5.2),
/// after the upgrade's HTTP answer: each one's FIN bit and payload length.
fn server_frames(wire: &[u8]) -> Vec<(bool, usize)> {
    let end = wire
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("the HTTP answer")
        + 4;
    let mut at = end;
    let mut out = Vec::new();
    while at + 2 <= wire.len() {
        let (b0, b1) = (wire[at], wire[at + 1]);
        let (len, header) = match b1 & 0x7f {
            126 if at + 4 <= wire.len() => (u16::from_be_bytes([wire[at + 2], wire[at + 3]]) as usize, 4),
            127 if at + 10 <= wire.len() => (
                u64::from_be_bytes(wire[at + 2..at + 10].try_into().unwrap()) as usize,
                10,
            ),
            126 | 127 => break,
            n => (n as usize, 2),
        };
        if at + header + len > wire.len() {
            break;
        }
        out.push((b0 & 0x80 != 0, len));
        at += header + len;
    }
    out
}

/// A joining volunteer's RW-256 snapshot (parameters and Adam's moments,
/// about 2.7 MiB) reaches it as one message, sent in WebSocket fragments of
/// at most `ws::FRAGMENT` bytes. tungstenite keeps a connection's write
/// buffer as large as the largest frame it ever sent: sent as one frame,
/// the snapshot would stay resident for every connection's life.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_reaches_a_volunteer_in_fragments() {
    let server = start(corpus_options(
        test_settings(1_000_000),
        seedling_core::RunConfig::rw256,
    ))
    .await;
    let (proxy, wire) = recording_proxy(server.addr).await;
    // Welcome and Snapshot received, whole, by a tungstenite client.
    let client = RawClient::join(&format!("ws://{proxy}/ws")).await;
    let frames = server_frames(&wire.lock().unwrap());
    let fragment = seedling_server::ws::FRAGMENT;
    let largest = frames.iter().map(|f| f.1).max().unwrap();
    assert!(largest <= fragment, "a frame of {largest} bytes");
    // The snapshot: a run of fragments that together hold over 2 MiB.
    let (mut run, mut longest) = (0, 0);
    for &(fin, len) in &frames {
        run += len;
        if fin {
            longest = longest.max(run);
            run = 0;
        }
    }
    assert!(longest > 2 << 20, "the longest message has {longest} bytes");
    drop(client);
    server.shutdown().await.unwrap();
}
