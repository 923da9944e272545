//! Sessions and bans: what outlives a connection.
//!
//! A volunteer's Hello may present the session token the server handed it
//! earlier. A known session carries over the trust its results earned
//! (fewer of them are replicated) and its strikes; a banned one (its client
//! was disconnected as a liar) is refused. Tokens are secrets from the OS's
//! random source, handed in by the driver with each connection.

use std::collections::{HashMap, VecDeque};

use seedling_core::protocol::SessionToken;

use super::Coordinator;
use super::types::{ClientId, Outgoing, Output, Outputs, close};

/// Sessions remembered (trust earned, or a ban) after their connection
/// ended; the oldest is forgotten first, so memory stays bounded.
const MAX_SESSIONS: usize = 100_000;

/// Why a banned session's Hello is refused.
const BANNED: &str = "this session was disconnected because its results disagreed with other \
                      volunteers' too often; it cannot rejoin";

/// What outlives a connection: the trust its session earned, or its ban.
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct SessionRecord {
    pub(super) agreed: u64,
    pub(super) strikes: u32,
    pub(super) banned: bool,
    /// The connection using it now, if any.
    pub(super) live: Option<ClientId>,
}

/// Sessions by token, and their order of creation for eviction.
#[derive(Debug, Default)]
pub(super) struct Sessions {
    pub(super) map: HashMap<SessionToken, SessionRecord>,
    pub(super) order: VecDeque<SessionToken>,
}

impl Sessions {
    /// Remembers a new session `token`, used by connection `id`, forgetting
    /// the oldest ones no connection uses if there are too many.
    fn create(&mut self, token: SessionToken, id: ClientId) {
        // Live sessions (at most one per connection) are skipped, not evicted.
        let mut tries = self.order.len();
        while self.map.len() >= MAX_SESSIONS && tries > 0 {
            tries -= 1;
            let Some(old) = self.order.pop_front() else {
                break;
            };
            if self.map.get(&old).is_some_and(|r| r.live.is_some()) {
                self.order.push_back(old);
            } else {
                self.map.remove(&old);
            }
        }
        let rec = SessionRecord {
            live: Some(id),
            ..SessionRecord::default()
        };
        self.map.insert(token, rec);
        self.order.push_back(token);
    }

    /// Bans `token`'s session; true if there was one.
    pub(super) fn ban(&mut self, token: Option<SessionToken>) -> bool {
        let Some(rec) = token.and_then(|t| self.map.get_mut(&t)) else {
            return false;
        };
        rec.banned = true;
        true
    }

    /// Connection `id` ended: its session keeps the trust and strikes it
    /// had, if `id` still held it.
    pub(super) fn release(&mut self, token: Option<SessionToken>, id: ClientId, agreed: u64, strikes: u32) {
        if let Some(rec) = token.and_then(|t| self.map.get_mut(&t))
            && rec.live == Some(id)
        {
            (rec.agreed, rec.strikes, rec.live) = (agreed, strikes, None);
        }
    }
}

impl Coordinator {
    /// Binds connection `id` to a session: the presented one if the server
    /// knows it (its trust moves over, and an older connection still holding
    /// it is closed), the connection's fresh token otherwise. A banned
    /// session is refused and the connection closed; then `None`.
    pub(super) fn resume_session(
        &mut self,
        id: ClientId,
        presented: Option<SessionToken>,
        out: &mut dyn Outputs,
    ) -> Option<SessionToken> {
        if let Some(token) = presented {
            if let Some(rec) = self.sessions.map.get(&token).copied() {
                if rec.banned {
                    self.refuse(id, BANNED, out);
                    return None;
                }
                let (mut agreed, mut strikes) = (rec.agreed, rec.strikes);
                if let Some(old) = rec.live.filter(|&old| old != id) {
                    if let Some(c) = self.clients.get(&old) {
                        (agreed, strikes) = (c.agreed, c.strikes);
                        let bye = Outgoing::Close(
                            close::POLICY,
                            "replaced by a newer connection of the same session".into(),
                        );
                        out.push(Output::Send(old, bye));
                    }
                    self.drop_client(old, out);
                }
                if let Some(c) = self.clients.get_mut(&id) {
                    (c.agreed, c.strikes, c.session) = (agreed, strikes, Some(token));
                }
                let rec = self.sessions.map.get_mut(&token).unwrap();
                rec.live = Some(id);
                return Some(token);
            }
            // A session from before a restart (or one forgotten) that has
            // credit here: it goes on under the same token, so its credit
            // keeps growing, with trust to earn again; unless it was banned.
            match self.credit.standing(&token) {
                Some(true) => {
                    self.refuse(id, BANNED, out);
                    return None;
                }
                Some(false) => {
                    let client = self.clients.get_mut(&id)?;
                    client.session = Some(token);
                    self.sessions.create(token, id);
                    return Some(token);
                }
                None => {}
            }
        }
        let client = self.clients.get_mut(&id)?;
        let Some(token) = client.fresh.take() else {
            // Without an OS random source there is no secret to hand out;
            // the client still trains, it just cannot resume its trust.
            return Some([0u8; 16]);
        };
        client.session = Some(token);
        self.sessions.create(token, id);
        Some(token)
    }
}
