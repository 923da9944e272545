//! What relays and the coordinator say to each other over NATS, around the
//! usual frames.
//!
//! A relay is one large client of the coordinator: what it sends upstream
//! is the very [`ClientMsg`](super::ClientMsg) bytes a volunteer sends on
//! `/ws`, and what it receives the [`ServerMsg`](super::ServerMsg) bytes.
//! NATS has no connections, no disconnect signal and a payload cap (1 MiB
//! by default; a snapshot with its past versions is larger), so each NATS
//! message is an envelope: a postcard header ([`Up`] or [`Down`]) followed
//! by raw bytes, a part of one frame. The header names the relay's
//! connection (`conn`, a number the relay increases on every reconnection,
//! so a stale message of an earlier one is told apart), and carries the
//! relay-only controls: its capacity, heartbeats, closes, and the credit
//! its volunteers earned.
//!
//! Subjects: a relay publishes on [`up_subject`] and listens on
//! [`down_subject`]; the coordinator listens on [`up_wildcard`].

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Longest relay id: a NATS subject token of letters, digits, `-` and `_`.
pub const MAX_RELAY_ID: usize = 64;

/// Longest public URL a relay announces (for the page's relay list).
pub const MAX_RELAY_URL: usize = 256;

/// Most contributors in one [`Up::Credit`].
pub const MAX_EARNED: usize = 1024;

/// What one of a relay's volunteers earned since the relay last said: the
/// coordinator keeps the leaderboard, the relay knows who did which work.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Earned {
    /// The SHA-256 of the volunteer's session token (the coordinator's
    /// credit key; the token itself, a secret, stays at the relay).
    pub key: [u8; 32],
    /// Its display name, already [`clean_name`](super::clean_name)d.
    pub name: String,
    /// Members whose losses the relay counted from its claims.
    pub members: u64,
    /// The relay banned the session as a liar: its credit is void.
    pub banned: bool,
}

/// Relay to coordinator: a header, then (for [`Up::Frame`]) a part of one
/// encoded `ClientMsg`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Up {
    /// Part `index` of `count` of one frame. The first frame of a new
    /// `conn` opens it (it must be the Hello).
    Frame {
        /// The relay's connection.
        conn: u64,
        /// This part's number, from 0.
        index: u32,
        /// How many parts the frame has.
        count: u32,
    },
    /// What the relay's volunteers can do together, refreshed as they come
    /// and go: the coordinator sizes the relay's jobs by it. `url` is where
    /// volunteers reach the relay's page (empty when not announced).
    Capacity {
        /// The relay's connection.
        conn: u64,
        /// The sum of its volunteers' threads.
        threads: u32,
        /// The sum of their measured speeds, members per second (0 = unknown).
        speed: f32,
        /// The relay's public URL.
        url: String,
    },
    /// The relay is alive (every second); 5 s without a message from a
    /// relay counts as its disconnection.
    Heartbeat {
        /// The relay's connection.
        conn: u64,
    },
    /// The relay ends this connection (like a closed WebSocket).
    Close {
        /// The relay's connection.
        conn: u64,
    },
    /// Credit for the relay's volunteers. The coordinator pays it out of
    /// the members it verified from this connection, so a relay can share
    /// out its own credit but not make more.
    Credit {
        /// The relay's connection.
        conn: u64,
        /// At most [`MAX_EARNED`] contributors.
        earned: Vec<Earned>,
    },
    /// The relay is alive and serves volunteers at `url` (empty when not
    /// announced): sent every second whether or not it has a connection,
    /// so the coordinator lists a relay for the page as long as it lives,
    /// not only while it has volunteers. It belongs to no connection.
    Presence {
        /// The relay's public URL.
        url: String,
    },
}

/// Coordinator to relay: a header, then (for [`Down::Frame`]) a part of one
/// encoded `ServerMsg`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Down {
    /// Part `index` of `count` of one frame.
    Frame {
        /// The relay's connection.
        conn: u64,
        /// This part's number, from 0.
        index: u32,
        /// How many parts the frame has.
        count: u32,
    },
    /// The answer to a heartbeat: the coordinator is alive and still knows
    /// this connection.
    Heartbeat {
        /// The relay's connection.
        conn: u64,
    },
    /// The coordinator ended (or does not know) this connection, like a
    /// WebSocket close: the relay reconnects with a new one.
    Closed {
        /// The relay's connection.
        conn: u64,
        /// The close code (RFC 6455 7.4.1).
        code: u16,
        /// Why.
        reason: String,
    },
}

impl Up {
    /// The connection this message belongs to (0, no connection, for
    /// [`Up::Presence`]).
    pub fn conn(&self) -> u64 {
        match self {
            Up::Frame { conn, .. }
            | Up::Capacity { conn, .. }
            | Up::Heartbeat { conn }
            | Up::Credit { conn, .. }
            | Up::Close { conn } => *conn,
            Up::Presence { .. } => 0,
        }
    }
}

impl Down {
    /// The connection this message belongs to.
    pub fn conn(&self) -> u64 {
        match self {
            Down::Frame { conn, .. } | Down::Heartbeat { conn } | Down::Closed { conn, .. } => *conn,
        }
    }
}

/// A relay id is valid when it is 1 to [`MAX_RELAY_ID`] ASCII letters,
/// digits, `-` or `_`: one NATS subject token, no wildcards or dots.
pub fn check_relay_id(id: &str) -> Result<()> {
    let ok = !id.is_empty()
        && id.len() <= MAX_RELAY_ID
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(Error::Wire(format!(
            "relay id {id:?} is not 1 to {MAX_RELAY_ID} letters, digits, '-' or '_'"
        )))
    }
}

/// The subject relay `relay` publishes on.
pub fn up_subject(prefix: &str, relay: &str) -> String {
    format!("seedling.{prefix}.up.{relay}")
}

/// The subject relay `relay` listens on.
pub fn down_subject(prefix: &str, relay: &str) -> String {
    format!("seedling.{prefix}.down.{relay}")
}

/// The subject the coordinator listens on: every relay's [`up_subject`].
pub fn up_wildcard(prefix: &str) -> String {
    format!("seedling.{prefix}.up.*")
}

/// The relay id in an [`up_subject`], if it is one of `prefix`'s.
pub fn relay_of<'a>(prefix: &str, subject: &'a str) -> Option<&'a str> {
    let rest = subject.strip_prefix("seedling.")?.strip_prefix(prefix)?;
    let id = rest.strip_prefix(".up.")?;
    check_relay_id(id).ok().map(|()| id)
}

/// Encodes an envelope: `header`'s postcard bytes, then `payload`.
pub fn envelope<T: Serialize>(header: &T, payload: &[u8]) -> Result<Vec<u8>> {
    let mut bytes = postcard::to_allocvec(header).map_err(|e| Error::Wire(format!("encode: {e}")))?;
    bytes.extend_from_slice(payload);
    Ok(bytes)
}

/// Splits an envelope into its header and payload. Only a frame's part
/// carries a payload; anything else with bytes after its header is refused.
pub fn open_up(bytes: &[u8]) -> Result<(Up, &[u8])> {
    let (up, rest): (Up, &[u8]) =
        postcard::take_from_bytes(bytes).map_err(|e| Error::Wire(format!("relay header: {e}")))?;
    match &up {
        Up::Frame { index, count, .. } => check_part(*index, *count)?,
        Up::Capacity { speed, .. } if !speed.is_finite() => return Err(Error::NonFinite),
        Up::Capacity { url, .. } | Up::Presence { url } if url.len() > MAX_RELAY_URL => {
            return Err(Error::Wire(format!("relay url over {MAX_RELAY_URL} bytes")));
        }
        Up::Credit { earned, .. } if earned.len() > MAX_EARNED => {
            return Err(Error::Wire(format!("credit for over {MAX_EARNED} contributors")));
        }
        Up::Credit { earned, .. } if earned.iter().any(|e| super::clean_name(&e.name) != e.name) => {
            return Err(Error::Wire("a credited name is not a clean name".into()));
        }
        _ if !rest.is_empty() => return Err(Error::Wire(format!("{} trailing bytes", rest.len()))),
        _ => {}
    }
    Ok((up, rest))
}

/// [`open_up`] for the coordinator's messages.
pub fn open_down(bytes: &[u8]) -> Result<(Down, &[u8])> {
    let (down, rest): (Down, &[u8]) =
        postcard::take_from_bytes(bytes).map_err(|e| Error::Wire(format!("relay header: {e}")))?;
    match &down {
        Down::Frame { index, count, .. } => check_part(*index, *count)?,
        _ if !rest.is_empty() => return Err(Error::Wire(format!("{} trailing bytes", rest.len()))),
        _ => {}
    }
    Ok((down, rest))
}

fn check_part(index: u32, count: u32) -> Result<()> {
    if index < count {
        Ok(())
    } else {
        Err(Error::Wire(format!("part {index} of {count}")))
    }
}

/// The parts of `frame` of at most `max` bytes each (at least one part,
/// empty for an empty frame), with their index and count.
pub fn parts(frame: &[u8], max: usize) -> impl Iterator<Item = (u32, u32, &[u8])> {
    let max = max.max(1);
    let count = frame.len().div_ceil(max).max(1);
    (0..count).map(move |i| {
        let part = &frame[(i * max).min(frame.len())..((i + 1) * max).min(frame.len())];
        (i as u32, count as u32, part)
    })
}

/// Joins the parts of frames arriving in order (NATS keeps one publisher's
/// order on one subject). A part out of order drops the frame being joined;
/// a frame longer than the cap is refused.
#[derive(Debug)]
pub struct Joiner {
    cap: usize,
    buf: Vec<u8>,
    next: u32,
    count: u32,
}

impl Joiner {
    /// Joins frames of at most `cap` bytes.
    pub fn new(cap: usize) -> Self {
        Self {
            cap,
            buf: Vec::new(),
            next: 0,
            count: 0,
        }
    }

    /// Takes part `index` of `count`: the whole frame once its last part is
    /// in, `Ok(None)` while parts are missing, an error when the part does
    /// not follow the one before (the frame is dropped) or the frame
    /// outgrows the cap.
    pub fn push(&mut self, index: u32, count: u32, part: &[u8]) -> Result<Option<Vec<u8>>> {
        if index == 0 {
            self.buf.clear();
            self.count = count;
        } else if index != self.next || count != self.count {
            self.next = 0;
            self.buf.clear();
            return Err(Error::Wire(format!(
                "part {index} of {count} after part {} of {}",
                self.next, self.count
            )));
        }
        if self.buf.len() + part.len() > self.cap {
            self.next = 0;
            self.buf.clear();
            return Err(Error::Wire(format!("a relayed frame over {} bytes", self.cap)));
        }
        self.buf.extend_from_slice(part);
        self.next = index + 1;
        if self.next < count {
            return Ok(None);
        }
        self.next = 0;
        Ok(Some(core::mem::take(&mut self.buf)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec;

    #[test]
    fn frames_split_into_parts_and_join_back() {
        let frame: Vec<u8> = (0..2500u32).map(|i| i as u8).collect();
        for max in [1, 7, 1000, 2500, 4096] {
            let mut j = Joiner::new(10_000);
            let mut whole = None;
            for (i, n, part) in parts(&frame, max) {
                assert!(part.len() <= max);
                let env = envelope(
                    &Down::Frame {
                        conn: 3,
                        index: i,
                        count: n,
                    },
                    part,
                )
                .unwrap();
                let (down, bytes) = open_down(&env).unwrap();
                assert_eq!(down.conn(), 3);
                let Down::Frame { index, count, .. } = down else {
                    panic!("{down:?}")
                };
                assert!(whole.is_none());
                whole = j.push(index, count, bytes).unwrap();
            }
            assert_eq!(whole.as_deref(), Some(&frame[..]), "max {max}");
        }
        // An empty frame is one empty part.
        let empty: Vec<_> = parts(&[], 10).collect();
        assert_eq!(empty, vec![(0, 1, &[][..])]);
        assert_eq!(Joiner::new(1).push(0, 1, &[]).unwrap(), Some(vec![]));
    }

    #[test]
    fn a_part_out_of_order_or_over_the_cap_drops_the_frame() {
        let mut j = Joiner::new(10);
        assert_eq!(j.push(0, 3, b"ab").unwrap(), None);
        assert!(j.push(2, 3, b"cd").is_err());
        // The next frame starts clean.
        assert_eq!(j.push(0, 2, b"xy").unwrap(), None);
        assert_eq!(j.push(1, 2, b"z").unwrap(), Some(b"xyz".to_vec()));
        assert!(j.push(0, 2, b"0123456789").unwrap().is_none());
        assert!(j.push(1, 2, b"!").is_err());
        assert!(j.push(1, 1, b"").is_err());
    }

    #[test]
    fn headers_are_checked() {
        let hb = envelope(&Up::Heartbeat { conn: 9 }, &[]).unwrap();
        assert_eq!(open_up(&hb).unwrap(), (Up::Heartbeat { conn: 9 }, &[][..]));
        let trailing = envelope(&Up::Close { conn: 9 }, b"x").unwrap();
        assert!(open_up(&trailing).is_err());
        let bad_part = envelope(
            &Up::Frame {
                conn: 1,
                index: 2,
                count: 2,
            },
            b"x",
        )
        .unwrap();
        assert!(open_up(&bad_part).is_err());
        let nan = Up::Capacity {
            conn: 1,
            threads: 4,
            speed: f32::NAN,
            url: String::new(),
        };
        assert!(open_up(&envelope(&nan, &[]).unwrap()).is_err());
        let long = Up::Capacity {
            conn: 1,
            threads: 4,
            speed: 1.0,
            url: "x".repeat(MAX_RELAY_URL + 1),
        };
        assert!(open_up(&envelope(&long, &[]).unwrap()).is_err());
        let long = Up::Presence {
            url: "x".repeat(MAX_RELAY_URL + 1),
        };
        assert!(open_up(&envelope(&long, &[]).unwrap()).is_err());
        let here = Up::Presence {
            url: "http://relay".into(),
        };
        assert_eq!(open_up(&envelope(&here, &[]).unwrap()).unwrap().0, here);
        assert_eq!(here.conn(), 0);
        let earned = |name: &str| Earned {
            key: [7; 32],
            name: name.into(),
            members: 12,
            banned: false,
        };
        let credit = Up::Credit {
            conn: 4,
            earned: vec![earned("ada")],
        };
        assert_eq!(open_up(&envelope(&credit, &[]).unwrap()).unwrap().0, credit);
        assert_eq!(credit.conn(), 4);
        for bad in [
            vec![earned("<b>\u{202e}bob")],
            vec![earned("ada"); MAX_EARNED + 1],
        ] {
            let up = Up::Credit { conn: 4, earned: bad };
            assert!(open_up(&envelope(&up, &[]).unwrap()).is_err());
        }
        let closed = Down::Closed {
            conn: 2,
            code: 1008,
            reason: "no".into(),
        };
        assert_eq!(open_down(&envelope(&closed, &[]).unwrap()).unwrap().0, closed);
        assert!(open_up(&[0xff, 0xff]).is_err());
        assert!(open_down(&[]).is_err());
    }

    #[test]
    fn subjects_name_the_relay() {
        assert_eq!(up_subject("run", "r1"), "seedling.run.up.r1");
        assert_eq!(down_subject("run", "r1"), "seedling.run.down.r1");
        assert_eq!(up_wildcard("run"), "seedling.run.up.*");
        assert_eq!(relay_of("run", "seedling.run.up.r1"), Some("r1"));
        assert_eq!(relay_of("run", "seedling.other.up.r1"), None);
        assert_eq!(relay_of("run", "seedling.run.down.r1"), None);
        assert_eq!(relay_of("run", "seedling.run.up.a.b"), None);
        for ok in ["a", "relay-1", "R_2"] {
            check_relay_id(ok).unwrap();
        }
        for bad in ["", "a.b", "a*", ">", "a b", &"x".repeat(65)] {
            assert!(check_relay_id(bad).is_err(), "{bad}");
        }
    }
}
