//! The Hello in the WebSocket upgrade request's URL.
//!
//! A volunteer's first message is its Hello. Sent as the first frame, it
//! can only go once the upgrade's answer is back: the server hears of the
//! volunteer one round trip after it connected, and the Welcome, the
//! snapshot and the first jobs come back a round trip later still. Carried
//! in the upgrade request's URL (`/ws?hello=...`, the Hello's postcard bytes
//! in URL-safe base64), the Hello reaches the server with the request, and
//! the server answers with the upgrade, the Welcome, the snapshot and the
//! first jobs at once: one round trip from connecting to working, where a
//! volunteer 150 ms away waited two. A browser's `WebSocket` can set
//! nothing of the request but its URL, hence the query.
//!
//! The URL then carries the session token, which stands for a
//! contributor's trust and credit. Seedling logs no request URL, and a
//! browser keeps no history of WebSocket URLs, but a reverse proxy in front
//! of a server may log them: such a proxy should drop the query of `/ws`
//! from its logs.
//!
//! The server takes the Hello from the URL or, as before, from the first
//! frame (a client that sends both sends a second Hello, which is refused).
//! The bytes decode with [`super::decode_client`], so a Hello in the URL is
//! checked exactly as a Hello frame is.

use alloc::string::String;
use alloc::vec::Vec;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;

use crate::error::{Error, Result};

/// The query parameter that carries the Hello.
pub const HELLO_PARAM: &str = "hello";

/// Longest Hello the URL may carry, in bytes before encoding. A Hello is
/// a few dozen bytes plus a display name of at most
/// [`super::MAX_NAME_CHARS`] characters; this leaves room and keeps the
/// request line well under the 8 KiB servers and proxies commonly accept.
pub const MAX_URL_HELLO: usize = 1024;

/// `base` (a `ws://` or `wss://` URL) with the encoded Hello `hello` added to
/// its query.
pub fn hello_url(base: &str, hello: &[u8]) -> String {
    let sep = if base.contains('?') { '&' } else { '?' };
    let mut url = String::with_capacity(base.len() + HELLO_PARAM.len() + 2 + hello.len().div_ceil(3) * 4);
    url.push_str(base);
    url.push(sep);
    url.push_str(HELLO_PARAM);
    url.push('=');
    URL_SAFE_NO_PAD.encode_string(hello, &mut url);
    url
}

/// The Hello's bytes in a request's query string (without the `?`), if it
/// carries one. Fails with [`Error::Wire`] on a parameter that is not
/// URL-safe base64, is longer than [`MAX_URL_HELLO`] bytes, or appears
/// twice: the request came from the network.
pub fn hello_in_query(query: &str) -> Result<Option<Vec<u8>>> {
    let mut found = None;
    for pair in query.split('&') {
        let Some(value) = pair.strip_prefix(HELLO_PARAM).and_then(|r| r.strip_prefix('=')) else {
            continue;
        };
        if found.is_some() {
            return Err(Error::Wire("the URL carries more than one Hello".into()));
        }
        if value.len() > MAX_URL_HELLO.div_ceil(3) * 4 {
            return Err(Error::Wire(alloc::format!(
                "the Hello in the URL is longer than {MAX_URL_HELLO} bytes"
            )));
        }
        let bytes = URL_SAFE_NO_PAD
            .decode(value)
            .map_err(|e| Error::Wire(alloc::format!("the Hello in the URL is not URL-safe base64: {e}")))?;
        found = Some(bytes);
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{ClientKind, ClientMsg, decode_client};
    use crate::volunteer::hello;

    /// A Hello put in a URL comes back out of its query byte for byte, and
    /// decodes to the same message, whatever else the URL's query holds.
    #[test]
    fn a_hello_survives_the_url() {
        let bytes = hello(ClientKind::Browser, 3, 120.5, Some([7; 16]), "Ada ⚙").unwrap();
        for base in ["ws://127.0.0.1:8080/ws", "wss://example.org/ws?room=a&x"] {
            let url = hello_url(base, &bytes);
            let query = url.split_once('?').unwrap().1;
            let value = query.rsplit('&').next().unwrap().strip_prefix("hello=").unwrap();
            assert!(!value.contains(['+', '/', '=', '%']), "{value}");
            let got = hello_in_query(query).unwrap().expect("a Hello in the query");
            assert_eq!(got, bytes);
            assert!(matches!(
                decode_client(&got).unwrap(),
                ClientMsg::Hello { threads: 3, .. }
            ));
        }
        assert_eq!(hello_in_query("").unwrap(), None);
        assert_eq!(hello_in_query("helloo=AAAA&x=1").unwrap(), None);
    }

    /// What a stranger can put in the query gets a clear error, not a panic.
    #[test]
    fn a_bad_hello_in_the_url_is_refused() {
        for (query, want) in [
            ("hello=%%%", "base64"),
            ("hello=AAAA&hello=AAAA", "more than one"),
        ] {
            let err = hello_in_query(query).unwrap_err();
            assert!(
                matches!(&err, Error::Wire(w) if w.contains(want)),
                "{query}: {err:?}"
            );
        }
        let long = alloc::format!("hello={}", "A".repeat(MAX_URL_HELLO.div_ceil(3) * 4 + 4));
        let err = hello_in_query(&long).unwrap_err();
        assert!(matches!(&err, Error::Wire(w) if w.contains("longer")), "{err:?}");
        // Decodable base64 that is not a Hello is the decoder's to refuse.
        let junk = hello_in_query("hello=AQID").unwrap().unwrap();
        assert!(decode_client(&junk).is_err());
    }
}
