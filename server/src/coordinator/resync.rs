//! How many snapshots a replica that diverged gets, for the coordinator's
//! clients and a relay's volunteers alike.
//!
//! Every update is hashed and reported, so a round trip's worth of reports
//! computed before a snapshot lands are still on the wire when it goes
//! out: those say nothing about the replica the snapshot made, and are not
//! checked. A replica that diverges again after each of `max` snapshots in
//! a row is broken or hostile, and is refused rather than sent the whole
//! model at every step.

/// One replica's record of the snapshots it was sent.
#[derive(Clone, Copy, Debug, Default)]
pub struct Resyncs {
    /// The step of its latest snapshot: a report for that step or earlier
    /// was computed before the snapshot could arrive.
    synced_at: u64,
    /// Snapshots sent for divergence since its last matching report.
    count: u32,
}

/// What to do about one hash report that could be checked.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// It matches: the replica is sound again.
    Agrees,
    /// It was computed before the latest snapshot landed: not checked.
    Stale,
    /// A divergence: send a snapshot (and call [`Resyncs::sent`]).
    Resync,
    /// It diverged again after as many snapshots as it may have: refuse
    /// it, for this reason.
    Refuse(String),
}

impl Resyncs {
    /// A snapshot of the state at `step` went out to this replica.
    pub fn sent(&mut self, step: u64) {
        self.synced_at = step;
    }

    /// Judges a report for `step` that `agrees` or not with the reference
    /// hash of that step; at most `max` snapshots in a row.
    pub fn judge(&mut self, step: u64, agrees: bool, max: u32) -> Verdict {
        if agrees {
            self.count = 0;
            Verdict::Agrees
        } else if step <= self.synced_at {
            Verdict::Stale
        } else if self.count >= max {
            Verdict::Refuse(format!("replica diverged again after {} snapshots", self.count))
        } else {
            self.count += 1;
            Verdict::Resync
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_replica_gets_max_snapshots_in_a_row_and_stale_reports_are_not_held_against_it() {
        let mut r = Resyncs::default();
        assert_eq!(r.judge(3, true, 2), Verdict::Agrees);
        assert_eq!(r.judge(4, false, 2), Verdict::Resync);
        r.sent(6);
        // Reports made before the snapshot of step 6 could land.
        assert_eq!(r.judge(5, false, 2), Verdict::Stale);
        assert_eq!(r.judge(6, false, 2), Verdict::Stale);
        assert_eq!(r.judge(7, false, 2), Verdict::Resync);
        r.sent(9);
        assert!(matches!(r.judge(10, false, 2), Verdict::Refuse(why) if why.contains("2 snapshots")));
        // A matching report in between starts the count again.
        let mut r = Resyncs::default();
        for step in [1, 3, 5, 7] {
            assert_eq!(r.judge(step, false, 1), Verdict::Resync);
            r.sent(step + 1);
            assert_eq!(r.judge(step + 1, true, 1), Verdict::Agrees);
        }
    }
}
