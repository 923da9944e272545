//! The Hello every connection starts with.

use alloc::vec::Vec;

use crate::error::Result;
use crate::protocol::{
    ClientKind, ClientMsg, MAX_CLIENT_MESSAGE, PROTOCOL_VERSION, SessionToken, clean_name, encode,
};

/// The encoded Hello: what kind of volunteer this is, how many members it
/// evaluates in parallel, an estimate of its speed in members per second
/// (0 = unknown; anything not finite and positive is sent as 0, so a bad
/// estimate cannot get the client refused), and the session token of an
/// earlier connection so the trust and credit it earned carry over, and the
/// display name, cleaned ([`clean_name`]) so any name a user types is sent
/// in the form the server accepts.
pub fn hello(
    kind: ClientKind,
    threads: u32,
    speed: f32,
    session: Option<SessionToken>,
    name: &str,
) -> Result<Vec<u8>> {
    let speed = if speed.is_finite() && speed > 0.0 {
        speed
    } else {
        0.0
    };
    let msg = ClientMsg::Hello {
        version: PROTOCOL_VERSION,
        kind,
        threads,
        speed,
        session,
        name: clean_name(name),
    };
    encode(&msg, MAX_CLIENT_MESSAGE)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::decode_client;

    #[test]
    fn hello_announces_the_kind_at_this_protocol_version() {
        for (kind, threads, speed, want) in [
            (ClientKind::Browser, 1, f32::NAN, 0.0),
            (ClientKind::Native, 6, 0.0, 0.0),
            (ClientKind::Browser, 1, -3.0, 0.0),
            (ClientKind::Native, 2, 12.5, 12.5),
        ] {
            let msg = decode_client(&hello(kind, threads, speed, Some([3; 16]), " a\u{202e}b  c\n").unwrap())
                .unwrap();
            assert_eq!(
                msg,
                ClientMsg::Hello {
                    version: PROTOCOL_VERSION,
                    kind,
                    threads,
                    speed: want,
                    session: Some([3; 16]),
                    name: "ab c".into(),
                }
            );
        }
    }
}
