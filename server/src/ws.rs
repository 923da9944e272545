//! The volunteers' WebSocket, upgraded and sent on tokio-tungstenite
//! directly.
//!
//! tungstenite formats every outgoing frame into one write buffer per
//! connection and drains it as the socket takes it: the buffer grows to the
//! largest frame the connection ever sent and never shrinks. A joining
//! volunteer is sent a snapshot (the parameters and Adam's moments: about
//! 2.7 MiB for RW-256), so a connection that sent it whole would hold that
//! much for its life, at a relay and at `seedling serve` alike. [`send`]
//! therefore sends a binary message longer than [`FRAGMENT`] as one
//! fragmented WebSocket message (RFC 6455 section 5.4): the buffer holds one
//! fragment at a time, and the peer's WebSocket (the browser's, tungstenite
//! in the native worker) hands the application the same single message as
//! before, within its own size limit. The protocol does not change.
//!
//! axum's `WebSocketUpgrade` has no way to send a frame (its `Message` has
//! no fragments), so [`Upgrade`] does the HTTP/1.1 upgrade itself, as axum
//! does, and hands over tokio-tungstenite's stream.

use std::future::Future;
use std::time::Duration;

use axum::body::Body;
use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, StatusCode, Version, header};
use axum::response::Response;
use bytes::Bytes;
use futures_util::{Sink, SinkExt};
use hyper::upgrade::{OnUpgrade, Upgraded};
use hyper_util::rt::TokioIo;
use seedling_core::protocol::handshake;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::frame::Frame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};

pub use tokio_tungstenite::tungstenite::Message;
pub use tokio_tungstenite::tungstenite::protocol::CloseFrame;

/// The largest payload of one frame the server sends. A connection's write
/// buffer holds about this much at most (one fragment, or one smaller
/// message, plus a frame header): well under the relays' memory budget per
/// volunteer, and large enough that a snapshot costs a few hundred writes.
pub const FRAGMENT: usize = 16 * 1024;

/// A volunteer's WebSocket after the upgrade.
pub type Socket = WebSocketStream<TokioIo<Upgraded>>;

/// The `/ws` extractor: an HTTP/1.1 WebSocket upgrade request (RFC 6455
/// section 4.2.1), checked as axum's `WebSocketUpgrade` checks it, and the
/// Hello its URL may carry (`seedling_core::protocol::handshake`).
pub struct Upgrade {
    key: HeaderValue,
    on_upgrade: OnUpgrade,
    config: WebSocketConfig,
    hello: Option<Vec<u8>>,
}

/// Whether header `name` is `value`, ignoring case.
fn header_is(headers: &HeaderMap, name: header::HeaderName, value: &str) -> bool {
    headers
        .get(name)
        .is_some_and(|h| h.as_bytes().eq_ignore_ascii_case(value.as_bytes()))
}

/// Whether header `name`, a comma-separated list, holds `token` (any case).
fn header_lists(headers: &HeaderMap, name: header::HeaderName, token: &str) -> bool {
    headers.get_all(name).iter().any(|h| {
        h.to_str()
            .is_ok_and(|s| s.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
    })
}

impl<S: Send + Sync> FromRequestParts<S> for Upgrade {
    type Rejection = (StatusCode, &'static str);

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        let bad = |why| Err((StatusCode::BAD_REQUEST, why));
        if parts.version != Version::HTTP_11 {
            return bad("WebSocket upgrades are served over HTTP/1.1");
        }
        if !header_lists(&parts.headers, header::CONNECTION, "upgrade") {
            return bad("the Connection header does not include 'upgrade'");
        }
        if !header_is(&parts.headers, header::UPGRADE, "websocket") {
            return bad("the Upgrade header is not 'websocket'");
        }
        if !header_is(&parts.headers, header::SEC_WEBSOCKET_VERSION, "13") {
            return bad("the Sec-WebSocket-Version header is not 13");
        }
        let Some(key) = parts.headers.get(header::SEC_WEBSOCKET_KEY).cloned() else {
            return bad("the Sec-WebSocket-Key header is missing");
        };
        // Only the query's form is checked here; the Hello's bytes are
        // decoded as the first frame would be, after the upgrade, so a bad
        // Hello gets the same Reject and close code either way.
        let hello = match handshake::hello_in_query(parts.uri.query().unwrap_or("")) {
            Ok(hello) => hello,
            Err(_) => return bad("the hello parameter is not one URL-safe base64 Hello of at most 1 KiB"),
        };
        let Some(on_upgrade) = parts.extensions.remove::<OnUpgrade>() else {
            return Err((StatusCode::UPGRADE_REQUIRED, "this connection cannot be upgraded"));
        };
        Ok(Self {
            key,
            on_upgrade,
            config: WebSocketConfig::default(),
            hello,
        })
    }
}

impl Upgrade {
    /// The socket's limits and buffer sizes (tungstenite's defaults until set).
    pub fn config(mut self, config: WebSocketConfig) -> Self {
        self.config = config;
        self
    }

    /// The `101 Switching Protocols` answer; once the client has it, the
    /// upgraded socket goes to `callback` in a task of its own, with the
    /// encoded Hello the request's URL carried, if any (the connection's
    /// first message, as if it were its first frame). A failed upgrade
    /// drops `callback` unrun (and whatever it holds).
    pub fn on_upgrade<F, Fut>(self, callback: F) -> Response
    where
        F: FnOnce(Socket, Option<Vec<u8>>) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let Upgrade {
            key,
            on_upgrade,
            config,
            hello,
        } = self;
        tokio::spawn(async move {
            let Ok(upgraded) = on_upgrade.await else {
                return;
            };
            let socket =
                WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, Some(config)).await;
            callback(socket, hello).await;
        });
        Response::builder()
            .status(StatusCode::SWITCHING_PROTOCOLS)
            .header(header::CONNECTION, HeaderValue::from_static("upgrade"))
            .header(header::UPGRADE, HeaderValue::from_static("websocket"))
            .header(header::SEC_WEBSOCKET_ACCEPT, derive_accept_key(key.as_bytes()))
            .body(Body::empty())
            .expect("a valid 101 response")
    }
}

/// The frames that carry binary `payload` as one message: a single frame up
/// to [`FRAGMENT`] bytes, else a Binary frame and Continuation frames of
/// [`FRAGMENT`] bytes each (the last may be shorter), only the last final.
/// Each is a slice of `payload`: nothing is copied until it is written.
pub fn frames(payload: Bytes) -> impl Iterator<Item = Frame> {
    let pieces = payload.len().div_ceil(FRAGMENT).max(1);
    (0..pieces).map(move |i| {
        let piece = payload.slice(i * FRAGMENT..((i + 1) * FRAGMENT).min(payload.len()));
        let opcode = if i == 0 {
            OpCode::Data(Data::Binary)
        } else {
            OpCode::Data(Data::Continue)
        };
        Frame::message(piece, opcode, i + 1 == pieces)
    })
}

/// Sends `msg` on `sink` and flushes it, a binary message longer than
/// [`FRAGMENT`] in fragments (see the module note), all within `timeout`.
/// Whether it went out: a failed or timed-out send means the connection is
/// done (a peer that stopped reading blocks a send once the socket buffers
/// are full, so the connection cannot outlive the timeout).
pub async fn send<S>(sink: &mut S, msg: Message, timeout: Duration) -> bool
where
    S: Sink<Message> + Unpin,
{
    let sent = tokio::time::timeout(timeout, async {
        match msg {
            Message::Binary(payload) if payload.len() > FRAGMENT => {
                for frame in frames(payload) {
                    sink.send(Message::Frame(frame)).await?;
                }
                Ok(())
            }
            msg => sink.send(msg).await,
        }
    })
    .await;
    matches!(sent, Ok(Ok(())))
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::StreamExt;
    use tokio::io::{AsyncReadExt, DuplexStream};
    use tokio_tungstenite::tungstenite::Error;

    /// A payload whose every byte tells where it was.
    fn payload(len: usize) -> Bytes {
        (0..len).map(|i| (i * 31 + i / 251) as u8).collect()
    }

    #[test]
    fn frames_cover_the_payload_in_order_with_only_the_last_final() {
        for len in [
            0,
            1,
            FRAGMENT - 1,
            FRAGMENT,
            FRAGMENT + 1,
            3 * FRAGMENT,
            170 * FRAGMENT + 5,
        ] {
            let data = payload(len);
            let frames: Vec<Frame> = frames(data.clone()).collect();
            assert_eq!(frames.len(), len.div_ceil(FRAGMENT).max(1), "{len} bytes");
            let mut joined = Vec::new();
            for (i, f) in frames.iter().enumerate() {
                let want = if i == 0 { Data::Binary } else { Data::Continue };
                assert_eq!(f.header().opcode, OpCode::Data(want), "frame {i} of {len} bytes");
                assert_eq!(f.header().is_final, i + 1 == frames.len());
                assert!(f.payload().len() <= FRAGMENT);
                joined.extend_from_slice(f.payload());
            }
            assert_eq!(joined, data[..], "{len} bytes");
        }
    }

    /// A server socket (as `/ws` gets it) and the raw bytes its peer reads.
    async fn server_and_raw_peer() -> (WebSocketStream<DuplexStream>, DuplexStream) {
        let (ours, theirs) = tokio::io::duplex(1 << 16);
        let server = WebSocketStream::from_raw_socket(ours, Role::Server, None).await;
        (server, theirs)
    }

    /// The server frames in `wire` (unmasked, RFC 6455 section 5.2): each
    /// one's FIN bit, opcode and payload length.
    fn frame_headers(wire: &[u8]) -> Vec<(bool, u8, usize)> {
        let mut out = Vec::new();
        let mut at = 0;
        while at < wire.len() {
            let (b0, b1) = (wire[at], wire[at + 1]);
            assert_eq!(b1 & 0x80, 0, "a server frame is not masked");
            let (len, header) = match b1 & 0x7f {
                126 => (u16::from_be_bytes([wire[at + 2], wire[at + 3]]) as usize, 4),
                127 => (
                    u64::from_be_bytes(wire[at + 2..at + 10].try_into().unwrap()) as usize,
                    10,
                ),
                n => (n as usize, 2),
            };
            out.push((b0 & 0x80 != 0, b0 & 0x0f, len));
            at += header + len;
        }
        out
    }

    #[tokio::test]
    async fn a_snapshot_sized_message_leaves_in_frames_no_larger_than_a_fragment() {
        // The largest frame a connection writes is what its write buffer
        // keeps for life: sent whole, a 2.7 MiB snapshot would be one frame.
        let (mut server, mut raw) = server_and_raw_peer().await;
        let snapshot = payload(2_800_000);
        let sender = tokio::spawn(async move {
            assert!(send(&mut server, Message::Binary(snapshot), Duration::from_secs(30)).await);
            assert!(
                send(
                    &mut server,
                    Message::binary(vec![7u8; 40]),
                    Duration::from_secs(30)
                )
                .await
            );
            drop(server);
        });
        let mut wire = Vec::new();
        raw.read_to_end(&mut wire).await.unwrap();
        sender.await.unwrap();
        let headers = frame_headers(&wire);
        let n = 2_800_000usize.div_ceil(FRAGMENT);
        assert_eq!(headers.len(), n + 1);
        assert!(headers.iter().all(|&(_, _, len)| len <= FRAGMENT));
        assert_eq!(headers[0], (false, 0x2, FRAGMENT));
        assert!(headers[1..n - 1].iter().all(|&h| h == (false, 0x0, FRAGMENT)));
        assert_eq!(headers[n - 1], (true, 0x0, 2_800_000 - (n - 1) * FRAGMENT));
        assert_eq!(headers[n], (true, 0x2, 40));
    }

    /// A client of the server, configured as the native worker configures
    /// its socket (a bound on the message), over a fresh pipe.
    async fn client_pair(
        max_message: usize,
    ) -> (WebSocketStream<DuplexStream>, WebSocketStream<DuplexStream>) {
        let (a, b) = tokio::io::duplex(1 << 16);
        let server = WebSocketStream::from_raw_socket(a, Role::Server, None).await;
        let config = WebSocketConfig::default()
            .max_message_size(Some(max_message))
            .max_frame_size(Some(max_message));
        let client = WebSocketStream::from_raw_socket(b, Role::Client, Some(config)).await;
        (server, client)
    }

    #[tokio::test]
    async fn the_client_reads_fragments_back_as_the_messages_sent_in_order() {
        let (mut server, mut client) = client_pair(4 << 20).await;
        let sent = [
            payload(5),
            payload(2_800_000),
            payload(FRAGMENT + 1),
            payload(FRAGMENT),
        ];
        let out = sent.clone();
        tokio::spawn(async move {
            for p in out {
                assert!(send(&mut server, Message::Binary(p), Duration::from_secs(30)).await);
            }
        });
        for want in sent {
            match client.next().await {
                Some(Ok(Message::Binary(got))) => assert_eq!(got, want),
                other => panic!("expected a binary message, got {other:?}"),
            }
        }
    }

    /// What the client makes of `frames`, raw frames from the server (a
    /// hostile or broken one): the first message or error it reads.
    async fn client_reads(frames: Vec<Frame>, max_message: usize) -> Option<Result<Message, Error>> {
        let (mut server, mut client) = client_pair(max_message).await;
        tokio::spawn(async move {
            for f in frames {
                if server.send(Message::Frame(f)).await.is_err() {
                    break;
                }
            }
            // The connection ends here, mid-message if the frames did.
        });
        client.next().await
    }

    #[tokio::test]
    async fn the_client_rejects_fragments_out_of_order_oversized_or_cut_short() {
        let piece = || payload(FRAGMENT);
        let cont = |last| Frame::message(piece(), OpCode::Data(Data::Continue), last);
        let start = || Frame::message(piece(), OpCode::Data(Data::Binary), false);
        // A continuation with no message to continue.
        let got = client_reads(vec![cont(true)], 1 << 20).await;
        assert!(matches!(got, Some(Err(Error::Protocol(_)))), "{got:?}");
        // A new message before the last one's final fragment.
        let got = client_reads(
            vec![start(), Frame::message(piece(), OpCode::Data(Data::Binary), true)],
            1 << 20,
        )
        .await;
        assert!(matches!(got, Some(Err(Error::Protocol(_)))), "{got:?}");
        // More fragments than the client's bound on a message, whatever
        // each one's size: the total is bounded, not only each frame.
        let mut long = vec![start()];
        long.extend((0..8).map(|i| cont(i == 7)));
        let got = client_reads(long, 4 * FRAGMENT).await;
        assert!(matches!(got, Some(Err(Error::Capacity(_)))), "{got:?}");
        // The connection ends before the final fragment: no message.
        let got = client_reads(vec![start(), cont(false)], 1 << 20).await;
        assert!(!matches!(got, Some(Ok(Message::Binary(_)))), "{got:?}");
    }
}
