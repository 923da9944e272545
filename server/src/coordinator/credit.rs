//! Credit: the verified members each contributor evaluated, across its
//! connections and the server's restarts, and the leaderboard made of them.
//!
//! A contributor is a session: the token the server handed out in a Welcome,
//! which a browser keeps in `localStorage` and a native worker in its
//! identity file, and presents again in every Hello. The token is a secret
//! (it resumes trust), so the tally is keyed by its SHA-256 ([`key_of`]),
//! which is what a checkpoint stores, and the leaderboard shows only a
//! short prefix of that ([`public_id`]), from which neither can be found.
//!
//! **What "verified" means.** A member is credited to a contributor when
//! its step closes, if its loss counted in the step's update and the
//! contributor's own claim on it agrees (within the tolerance the
//! coordinator compares replicas with) with the loss that counted. Under
//! adaptive replication (`verify.rs`) most members of a trusted contributor
//! are evaluated once: such a member counts on its single claim, checked by
//! sampling (a fraction of that contributor's claims is replicated, and a
//! contributor caught lying loses everything), so it is credited. A
//! replicated member credits every claimant that agreed: both of a matching
//! pair, or the majority of three (the minority gets a strike, not credit).
//! A member settled without a second opinion credits the claim chosen (and
//! any that agree with it). A member voided when a liar was disconnected,
//! or still in flight at the close, credits nobody. And a contributor whose
//! session is banned as a liar has its whole tally voided: set to zero and
//! marked banned, kept that way (so the ban outlives a restart, and the
//! leaderboard says why the name has nothing), and never credited again.
//!
//! **Through relays.** A relay is one client here, not a contributor: the
//! members verified from its claims go into its purse, and the relay says
//! which of its volunteers earned them ([`Earned`], by the key of the
//! volunteer's token and its name; the relay checks its volunteers as this
//! coordinator checks its clients). The purse pays what is owed in the
//! order it was reported, never more than it holds (twice the members
//! verified from the relay, since a chunk a second volunteer checked there
//! credits both): a relay can share out the credit its work earned here,
//! not make more. A volunteer keeps one
//! row whether it joins directly or through any relay, since relays take
//! the token it presents.

use std::cell::RefCell;
use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::{Duration, Instant};

use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};

use seedling_core::protocol::relay::{Earned, MAX_EARNED};
use seedling_core::protocol::{SessionToken, clean_name};
use sha2::{Digest, Sha256};

use super::Coordinator;
use super::ledger::Ledger;
use super::types::{ClientId, Contributor, Leaderboard};
use crate::checkpoint::ContributorRecord;
use seedling_core::protocol::ClientKind;

/// Contributors remembered. Past this, a newcomer replaces the one with
/// the fewest members that is neither banned nor connected, so memory stays
/// bounded whatever the churn of anonymous one-time visitors.
const MAX_CONTRIBUTORS: usize = 100_000;

/// Rows on the leaderboard.
pub(super) const BOARD_SIZE: usize = 100;

/// Reported credit a relay's purse holds while its members are not yet
/// verified, past which the oldest is dropped.
const MAX_OWED: usize = 4 * MAX_EARNED;

/// How often the published status may rebuild the leaderboard while credit
/// keeps changing: a rebuild ranks every contributor, and relays report
/// thousands of volunteers' credit every few seconds.
const BOARD_EVERY: Duration = Duration::from_secs(1);

/// Bytes of the key shown, hex-encoded, as a contributor's public id.
const PUBLIC_ID_BYTES: usize = 6;

/// The tally's key for a session token: its SHA-256, so a checkpoint that
/// leaks does not hand out tokens that resume sessions.
pub fn key_of(token: &SessionToken) -> [u8; 32] {
    Sha256::digest(token).into()
}

/// A contributor's public id: the first 12 hex digits of its key. The page
/// derives the same from the token it keeps, to find itself on the board.
pub fn public_id(key: &[u8; 32]) -> String {
    let mut s = String::with_capacity(2 * PUBLIC_ID_BYTES);
    for b in &key[..PUBLIC_ID_BYTES] {
        let _ = write!(s, "{b:02x}");
    }
    s
}

/// One contributor's credit.
#[derive(Clone, Debug, Default, PartialEq)]
struct Entry {
    name: String,
    members: u64,
    banned: bool,
}

/// Every contributor's credit, and which connection is whose.
#[derive(Debug, Default)]
pub struct Credit {
    /// Keyed by SHA-256 digests of server-made tokens and by server-made
    /// ids: nobody can aim at collisions, so a fast hash (foldhash) does.
    tally: HashMap<[u8; 32], Entry, foldhash::fast::RandomState>,
    /// The key of every connection that joined: a client that left before
    /// its members' steps closed is still credited at their closes, then
    /// forgotten.
    live: HashMap<ClientId, [u8; 32], foldhash::fast::RandomState>,
    /// Every relay connection's purse.
    purses: HashMap<ClientId, Purse, foldhash::fast::RandomState>,
    /// The leaderboard and when it was built, rebuilt when asked after a
    /// change (at most every [`BOARD_EVERY`] for the published status).
    board: RefCell<Option<(Instant, Arc<Leaderboard>)>>,
    /// A change since the board was built.
    dirty: std::cell::Cell<bool>,
}

/// A relay connection's credit: verified members not yet shared out, and
/// what its volunteers earned that has not been paid yet.
#[derive(Debug, Default)]
struct Purse {
    budget: u64,
    owed: VecDeque<Earned>,
}

impl Credit {
    /// The tally a checkpoint kept.
    pub fn from_records(records: Vec<ContributorRecord>) -> Self {
        let tally = records
            .into_iter()
            .map(|r| {
                let entry = Entry {
                    name: clean_name(&r.name),
                    members: if r.banned { 0 } else { r.members },
                    banned: r.banned,
                };
                (r.key, entry)
            })
            .collect();
        Self {
            tally,
            ..Self::default()
        }
    }

    /// The tally for a checkpoint, in key order (so equal tallies write
    /// equal files).
    pub fn records(&self) -> Vec<ContributorRecord> {
        let mut v: Vec<ContributorRecord> = self
            .tally
            .iter()
            .map(|(k, e)| ContributorRecord {
                key: *k,
                name: e.name.clone(),
                members: e.members,
                banned: e.banned,
            })
            .collect();
        v.sort_by_key(|r| r.key);
        v
    }

    /// Whether `token` has credit here, and if so whether it is banned.
    pub fn standing(&self, token: &SessionToken) -> Option<bool> {
        self.tally.get(&key_of(token)).map(|e| e.banned)
    }

    /// Connection `id` joined as the session `token` under `name` (cleaned;
    /// the latest Hello's name is the contributor's name, empty for none).
    pub fn join(&mut self, id: ClientId, token: &SessionToken, name: &str) {
        let key = key_of(token);
        if !self.tally.contains_key(&key) && self.tally.len() >= MAX_CONTRIBUTORS {
            self.evict();
        }
        let entry = self.tally.entry(key).or_default();
        let name = clean_name(name);
        if entry.name != name {
            entry.name = name;
            self.changed();
        }
        self.live.insert(id, key);
    }

    /// Forgets the contributor with the fewest members that is neither
    /// banned nor connected.
    fn evict(&mut self) {
        let live: std::collections::HashSet<&[u8; 32]> = self.live.values().collect();
        let victim = self
            .tally
            .iter()
            .filter(|(k, e)| !e.banned && !live.contains(k))
            .min_by_key(|(k, e)| (e.members, **k))
            .map(|(k, _)| *k);
        if let Some(k) = victim {
            self.tally.remove(&k);
            self.changed();
        }
    }

    /// Connection `id` is a relay: the credit of its members goes to its
    /// volunteers (see the module docs).
    pub fn join_relay(&mut self, id: ClientId) {
        self.purses.entry(id).or_default();
    }

    /// Relay connection `id` reports what its volunteers earned: a ban
    /// voids the contributor at once, the rest is paid as the purse allows.
    /// Ignored from a connection that is not a relay's.
    pub fn relay_earned(&mut self, id: ClientId, earned: Vec<Earned>) {
        let Some(purse) = self.purses.get_mut(&id) else {
            return;
        };
        let mut voided = Vec::new();
        for e in earned {
            if e.banned {
                voided.push(e.key);
            } else if e.members > 0 {
                if purse.owed.len() >= MAX_OWED {
                    purse.owed.pop_front();
                }
                purse.owed.push_back(e);
            }
        }
        for key in voided {
            let e = self.tally.entry(key).or_default();
            (e.members, e.banned) = (0, true);
            self.changed();
        }
        self.pay(id);
    }

    /// Pays relay `id`'s volunteers what it owes them, oldest first, as far
    /// as its purse goes.
    fn pay(&mut self, id: ClientId) {
        let Some(purse) = self.purses.get_mut(&id) else {
            return;
        };
        let mut paid = Vec::new();
        while purse.budget > 0
            && let Some(front) = purse.owed.front_mut()
        {
            let n = front.members.min(purse.budget);
            (purse.budget, front.members) = (purse.budget - n, front.members - n);
            if front.members == 0 {
                let e = purse.owed.pop_front().expect("the front");
                paid.push((e.key, e.name, n));
            } else {
                paid.push((front.key, front.name.clone(), n));
            }
        }
        self.grant(paid);
    }

    /// Credits what a relay paid: (key, name, members); names come clean
    /// (the relay header does not decode otherwise).
    fn grant(&mut self, paid: Vec<([u8; 32], String, u64)>) {
        if paid.is_empty() {
            return;
        }
        for (key, name, n) in paid {
            if !self.tally.contains_key(&key) && self.tally.len() >= MAX_CONTRIBUTORS {
                self.evict();
            }
            let e = self.tally.entry(key).or_default();
            if !e.banned {
                e.members += n;
                if e.name != name {
                    e.name = name;
                }
            }
        }
        self.changed();
    }

    /// Credits `n` verified members to connection `id`'s contributor, or
    /// to its purse if it is a relay; false if it has none (no session) or
    /// is banned.
    pub fn credit(&mut self, id: ClientId, n: u64) -> bool {
        if let Some(purse) = self.purses.get_mut(&id) {
            // Twice: a chunk that a second volunteer at the relay checked
            // credits both, as a replicated member here credits both.
            purse.budget += n.saturating_mul(2);
            self.pay(id);
            return true;
        }
        let Some(e) = self.live.get(&id).and_then(|k| self.tally.get_mut(k)) else {
            return false;
        };
        if e.banned {
            return false;
        }
        e.members += n;
        self.changed();
        true
    }

    /// The contributor behind connection `id`, for crediting a member once
    /// per contributor.
    pub fn key(&self, id: ClientId) -> Option<[u8; 32]> {
        self.live.get(&id).copied().or_else(|| {
            // A relay: a key of its own that no SHA-256 digest will be.
            self.purses.contains_key(&id).then(|| {
                let mut k = [0xff; 32];
                k[..8].copy_from_slice(&id.to_le_bytes());
                k
            })
        })
    }

    /// The session `token` was banned: its credit is void, for good.
    pub fn void(&mut self, token: Option<SessionToken>) {
        let Some(token) = token else { return };
        let e = self.tally.entry(key_of(&token)).or_default();
        (e.members, e.banned) = (0, true);
        self.changed();
    }

    /// After a close: forgets the connections that have left.
    pub fn retain_live(&mut self, connected: impl Fn(ClientId) -> bool) {
        self.live.retain(|&id, _| connected(id));
        self.purses.retain(|&id, _| connected(id));
    }

    fn changed(&mut self) {
        self.dirty.set(true);
    }

    /// The leaderboard now; built once per change, shared after.
    pub fn board(&self) -> Arc<Leaderboard> {
        self.board_at(Instant::now(), Duration::ZERO)
    }

    /// The leaderboard for a status published at `now`: as [`Credit::board`],
    /// but rebuilt at most every [`BOARD_EVERY`].
    pub fn published_board(&self, now: Instant) -> Arc<Leaderboard> {
        self.board_at(now, BOARD_EVERY)
    }

    fn board_at(&self, now: Instant, every: Duration) -> Arc<Leaderboard> {
        let mut cached = self.board.borrow_mut();
        if let Some((built, board)) = cached.as_ref()
            && (!self.dirty.get() || now.saturating_duration_since(*built) < every)
        {
            return board.clone();
        }
        let board = Arc::new(self.build());
        *cached = Some((now, board.clone()));
        self.dirty.set(false);
        board
    }

    fn build(&self) -> Leaderboard {
        // The best BOARD_SIZE in one pass, in a min-heap on (members, then
        // the smaller key first): most contributors lose to the heap's
        // weakest on their members alone, with no key compared and no list
        // of everyone made.
        // A contributor's place: more members first, then the smaller key.
        type Place<'a> = (u64, Reverse<&'a [u8; 32]>);
        let mut top: BinaryHeap<Reverse<Place<'_>>> = BinaryHeap::with_capacity(BOARD_SIZE + 1);
        for (k, e) in &self.tally {
            let rank = (e.members, Reverse(k));
            if top.len() < BOARD_SIZE {
                top.push(Reverse(rank));
            } else if top.peek().is_some_and(|w| rank > w.0) {
                top.pop();
                top.push(Reverse(rank));
            }
        }
        let mut rows: Vec<(&[u8; 32], &Entry)> = top
            .into_iter()
            .map(|Reverse((_, Reverse(k)))| (k, &self.tally[k]))
            .collect();
        rows.sort_unstable_by(|a, b| b.1.members.cmp(&a.1.members).then(a.0.cmp(b.0)));
        Leaderboard {
            total: self.tally.len(),
            contributors: rows
                .into_iter()
                .enumerate()
                .map(|(i, (k, e))| Contributor {
                    rank: i + 1,
                    id: public_id(k),
                    name: e.name.clone(),
                    members: e.members,
                    banned: e.banned,
                })
                .collect(),
        }
    }
}

impl Coordinator {
    /// A connection past its Hello joined under `name`: it earns credit for
    /// its session, if it has one (without the OS's randomness it has no
    /// token, and trains without credit).
    pub(super) fn credit_join(&mut self, id: ClientId, name: &str) {
        let Some(c) = self.clients.get(&id) else { return };
        if c.hello.is_some_and(|h| h.0 == ClientKind::Relay) {
            self.credit.join_relay(id);
        } else if let Some(token) = c.session {
            self.credit.join(id, &token, name);
        }
    }

    /// The step whose ledger is `books` is closing (it has left the open
    /// steps): credits each of its counted members to every contributor
    /// whose claim agrees with the loss that counted, once per contributor
    /// (see the module docs for why this is "verified").
    pub(super) fn credit_close(&mut self, books: &Ledger) {
        let tol = self.settings.tolerance;
        let agree = |a: f32, b: f32| (a - b).abs() <= tol * a.abs().max(1.0);
        // Counted per connection first, then credited once per connection:
        // a step's thousands of members cost a lookup each, not three.
        let mut per_client: HashMap<ClientId, u64, foldhash::fast::RandomState> = HashMap::default();
        let mut seen: Vec<[u8; 32]> = Vec::with_capacity(3);
        for (m, loss) in books.results() {
            match books.claims(m) {
                // One claim (most members of trusted contributors): no
                // contributor to tell apart.
                &[(id, claimed)] => {
                    if agree(loss, claimed) {
                        *per_client.entry(id).or_default() += 1;
                    }
                }
                claims => {
                    seen.clear();
                    for &(id, claimed) in claims {
                        let Some(key) = self.credit.key(id) else { continue };
                        if agree(loss, claimed) && !seen.contains(&key) {
                            seen.push(key);
                            *per_client.entry(id).or_default() += 1;
                        }
                    }
                }
            }
        }
        for (id, n) in per_client {
            self.credit.credit(id, n);
        }
        // A connection that left is still credited when a step in flight
        // that holds its claims closes; after that it is forgotten.
        let (clients, open) = (&self.clients, &self.open);
        self.credit.retain_live(|id| {
            clients.contains_key(&id) || open.iter().any(|o| !o.books.claimed_by(id).is_empty())
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(key: u8, name: &str, members: u64, banned: bool) -> ContributorRecord {
        ContributorRecord {
            key: [key; 32],
            name: name.into(),
            members,
            banned,
        }
    }

    #[test]
    fn the_board_ranks_by_members_and_never_shows_a_token() {
        let mut c = Credit::default();
        let (a, b) = ([1u8; 16], [2u8; 16]);
        c.join(1, &a, "ada");
        c.join(2, &b, "  bob\u{202e} ");
        for _ in 0..3 {
            assert!(c.credit(2, 1));
        }
        assert!(c.credit(1, 1));
        assert!(!c.credit(9, 1), "an unknown connection has no credit");
        let board = c.board();
        assert_eq!(board.total, 2);
        let names: Vec<(&str, u64, usize)> = board
            .contributors
            .iter()
            .map(|r| (r.name.as_str(), r.members, r.rank))
            .collect();
        assert_eq!(names, [("bob", 3, 1), ("ada", 1, 2)]);
        assert_eq!(board.contributors[1].id, public_id(&key_of(&a)));
        assert_eq!(board.contributors[1].id.len(), 12);
        let json = serde_json::to_string(&*board).unwrap();
        let hex = |t: &[u8]| t.iter().map(|b| format!("{b:02x}")).collect::<String>();
        assert!(!json.contains(&hex(&a)) && !json.contains(&hex(&key_of(&a))));
    }

    /// A liar's credit is void, stays void, and outlives a restart.
    #[test]
    fn a_banned_session_loses_its_credit_for_good() {
        let mut c = Credit::default();
        let t = [7u8; 16];
        c.join(1, &t, "liar");
        assert!(c.credit(1, 1) && c.credit(1, 1));
        c.void(Some(t));
        assert!(!c.credit(1, 1), "a banned contributor earns nothing");
        let row = &c.board().contributors[0];
        assert_eq!((row.members, row.banned), (0, true));
        assert_eq!(c.standing(&t), Some(true));
        let back = Credit::from_records(c.records());
        assert_eq!(back.standing(&t), Some(true));
        assert_eq!(back.board().contributors[0].members, 0);
        // A file that says banned with members still reads as void.
        let forged = Credit::from_records(vec![record(3, "x", 50, true)]);
        assert_eq!(forged.board().contributors[0].members, 0);
    }

    /// A relay shares out what its members earned here: what it reports
    /// is paid as its purse fills (twice its verified members), in the
    /// order reported, never more; a ban it reports voids the contributor;
    /// a connection that is not a relay's reports nothing.
    #[test]
    fn a_relay_pays_its_volunteers_out_of_its_own_verified_members() {
        let mut c = Credit::default();
        let (ada, bob) = (key_of(&[1u8; 16]), key_of(&[2u8; 16]));
        let earned = |key: [u8; 32], name: &str, members: u64, banned: bool| Earned {
            key,
            name: name.into(),
            members,
            banned,
        };
        c.join(1, &[9u8; 16], "direct");
        c.join_relay(5);
        assert!(c.key(5).is_some_and(|k| k != ada && c.key(1) != Some(k)));
        c.relay_earned(
            5,
            vec![earned(ada, "ada", 30, false), earned(bob, "bob", 20, false)],
        );
        assert_eq!(
            c.board().total,
            1,
            "nothing paid before the relay's members are verified"
        );
        assert!(c.credit(5, 20), "a relay's verified members fill its purse");
        let members = |c: &Credit, name: &str| {
            c.board()
                .contributors
                .iter()
                .find(|r| r.name == name)
                .map(|r| r.members)
        };
        assert_eq!((members(&c, "ada"), members(&c, "bob")), (Some(30), Some(10)));
        assert!(c.credit(5, 100));
        assert_eq!(members(&c, "bob"), Some(20), "paid in full, and no more");
        assert_eq!(members(&c, "relay"), None, "the relay has no row");
        // The relay banned bob: his credit is void, for good.
        c.relay_earned(5, vec![earned(bob, "bob", 0, true)]);
        c.relay_earned(5, vec![earned(bob, "bob", 5, false)]);
        assert_eq!(members(&c, "bob"), Some(0));
        assert!(c.board().contributors.iter().any(|r| r.name == "bob" && r.banned));
        // A direct volunteer's connection cannot report credit.
        c.relay_earned(1, vec![earned(ada, "ada", 1_000, false)]);
        assert!(c.credit(1, 1));
        assert_eq!(members(&c, "ada"), Some(30));
        // The purse goes with the relay's connection.
        c.retain_live(|id| id == 1);
        assert!(c.key(5).is_none());
        c.relay_earned(5, vec![earned(ada, "ada", 1, false)]);
        assert_eq!(members(&c, "ada"), Some(30));
    }

    #[test]
    fn the_board_keeps_the_top_and_memory_stays_bounded() {
        let records: Vec<ContributorRecord> = (0..=255u8)
            .map(|k| record(k, &format!("n{k}"), k as u64, false))
            .collect();
        let c = Credit::from_records(records.clone());
        let board = c.board();
        assert_eq!(board.total, 256);
        assert_eq!(board.contributors.len(), BOARD_SIZE);
        assert_eq!(board.contributors[0].members, 255);
        assert_eq!(
            board.contributors[BOARD_SIZE - 1].members,
            256 - BOARD_SIZE as u64
        );
        assert_eq!(c.records(), records, "records come back in key order");
        // Ties go to the smaller key, at the cut too.
        let tied: Vec<ContributorRecord> = (0..150u8).rev().map(|k| record(k, "t", 5, false)).collect();
        let board = Credit::from_records(tied).board();
        let keys: Vec<String> = board.contributors.iter().map(|r| r.id.clone()).collect();
        let want: Vec<String> = (0..BOARD_SIZE as u8).map(|k| public_id(&[k; 32])).collect();
        assert_eq!(keys, want);
    }
}
