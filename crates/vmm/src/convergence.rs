//! The provider's pre-copy policy: a built-in extension (docs/extensions.md) that decides,
//! after each fetch of the dirty log, whether a live migration sends another round, slows
//! the guest down, pauses it for stop-and-copy or switches to post-copy. The migration engine
//! measures (pages, bandwidth, dirty rate, round trip) and asks the VM's modules; this module
//! is installed in every VM as a provider module and always answers, and a tenant module the
//! policy grants `migration` may replace its answer with its own (within the engine's bound
//! on rounds). It keeps what it learns over the rounds of one migration: whether a dirty set
//! has fit the budget yet, the smallest dirty set so far, and the rounds since it shrank.

use crate::extension::{Convergence, Extension, HookError, RoundFacts};
use std::sync::Mutex;
use std::time::Duration;

/// The module's name in every VM.
pub const NAME: &str = "precopy";

/// A dirty set this small (256 KiB) goes out in stop-and-copy without another round first.
pub const SETTLED_PAGES: u64 = 64;

/// Bytes a page takes in the stream (its number and its data).
const PAGE_ON_WIRE: f64 = (8 + 4096) as f64;

/// Whether another round would leave little less behind: fitting the downtime budget is not
/// enough while a round still halves the dirty set, because the downtime is what the guest
/// dirties during the last pass, and the guest feels all of it.
pub fn settled(dirty_pages: u64, sent_last_round: u64) -> bool {
    dirty_pages <= SETTLED_PAGES || dirty_pages * 2 > sent_last_round
}

/// Whether stop-and-copy may start with `dirty_bytes` left: sending them must fit the budget,
/// and so must what the switch will then take with the guest paused — the pages it dirties
/// while those and the bytes still in flight go out and the SYNC is answered, then one round
/// trip for the handover.
pub fn fits_downtime(
    dirty_bytes: f64,
    in_flight: f64,
    bandwidth: f64,
    dirty_rate: f64,
    rtt: Duration,
    budget: Duration,
) -> bool {
    let (rtt, budget) = (rtt.as_secs_f64(), budget.as_secs_f64());
    let bandwidth = bandwidth.max(1.0);
    let last_pass = dirty_bytes / bandwidth;
    // Of the bytes in flight, a round trip's worth is on the wire; the rest waits in queues.
    let queued = (in_flight - bandwidth * rtt).max(0.0);
    let synced = (queued + dirty_bytes) / bandwidth + rtt;
    let paused = dirty_rate * synced / bandwidth + rtt;
    last_pass <= budget && paused <= budget
}

/// What the policy remembers between the rounds of one migration.
#[derive(Clone, Copy, Debug)]
struct Progress {
    /// A dirty set has fit the budget: from now on rounds run only while they halve it.
    settling: bool,
    /// The smallest dirty set so far (since the last throttle step).
    best_dirty: u64,
    /// Fetches since the dirty set last shrank.
    rounds_without_progress: u32,
}

impl Default for Progress {
    fn default() -> Self {
        Self {
            settling: false,
            best_dirty: u64::MAX,
            rounds_without_progress: 0,
        }
    }
}

/// The engine's own convergence policy: pre-copy until what is left fits the downtime budget
/// and a round no longer halves it; slow the guest down step by step while the dirty set
/// stops shrinking; switch to post-copy (when the migration allows it) once pre-copy is stuck.
#[derive(Default)]
pub struct PrecopyPolicy {
    progress: Mutex<Progress>,
}

impl PrecopyPolicy {
    /// A policy with nothing learned yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Its answer to `facts`, learning from them.
    pub fn decide(&self, facts: &RoundFacts) -> Convergence {
        let mut p = self.progress.lock().unwrap_or_else(|e| e.into_inner());
        if facts.round == 0 {
            // The first fetch after the first pass: a new migration.
            *p = Progress::default();
        }
        let dirty_bytes = facts.dirty_pages as f64 * PAGE_ON_WIRE;
        let fits = fits_downtime(
            dirty_bytes,
            facts.in_flight as f64,
            facts.bandwidth,
            facts.dirty_rate,
            facts.rtt,
            facts.max_downtime,
        );
        if facts.dirty_pages >= p.best_dirty {
            p.rounds_without_progress += 1;
        } else {
            p.best_dirty = facts.dirty_pages;
            p.rounds_without_progress = 0;
        }
        // Stuck: the dirty set stopped shrinking, or the guest dirties more than half of what
        // the link carries (pre-copy would take many rounds and still leave much behind).
        let stuck = !fits
            && !p.settling
            && (p.rounds_without_progress >= 2 || (facts.round >= 1 && facts.dirty_rate > facts.bandwidth / 2.0));
        if stuck && facts.postcopy_allowed {
            return Convergence::PostCopy;
        }
        // Once a dirty set has fit, the rounds after it run only while they halve it: a set
        // that stops fitting then ends pre-copy instead of starting the search over.
        if (fits && settled(facts.dirty_pages, facts.sent_last_round))
            || (p.settling && !fits)
            || facts.round >= facts.max_rounds
            || (p.rounds_without_progress >= 3 && facts.throttle_maxed)
        {
            return Convergence::StopAndCopy;
        }
        p.settling |= fits;
        // The guest dirties faster than the link carries: slow its vCPUs down, step by step.
        if p.rounds_without_progress >= 2 && facts.throttle_allowed && !facts.throttle_maxed {
            p.rounds_without_progress = 0;
            p.best_dirty = u64::MAX;
            return Convergence::Throttle;
        }
        Convergence::NextRound
    }
}

impl Extension for PrecopyPolicy {
    fn takes_convergence(&self) -> bool {
        true
    }

    fn converge(&self, facts: &RoundFacts) -> Result<Option<Convergence>, HookError> {
        Ok(Some(self.decide(facts)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pre_copy_goes_on_while_a_round_halves_the_dirty_set() {
        // 5600 pages dirtied while 65000 went out: another round will leave far fewer.
        assert!(!settled(5600, 65000));
        assert!(settled(5600, 9000));
        // A few pages go out with the guest paused at once.
        assert!(settled(SETTLED_PAGES, 100_000));
    }

    #[test]
    fn the_downtime_budget_counts_the_round_trip_and_what_the_guest_dirties_meanwhile() {
        let mb = 1e6;
        let budget = Duration::from_millis(50);
        let wan = Duration::from_millis(20);
        // 3 MB at 80 MB/s is 37.5 ms: enough on a local link with an idle guest.
        assert!(fits_downtime(3.0 * mb, 0.0, 80.0 * mb, 0.0, Duration::ZERO, budget));
        // Over 20 ms RTT with a guest dirtying 64 MB/s, the pause would take ~66 ms.
        assert!(!fits_downtime(3.0 * mb, 0.0, 80.0 * mb, 64.0 * mb, wan, budget));
        // 1 MB left: ~46 ms...
        assert!(fits_downtime(1.0 * mb, 0.0, 80.0 * mb, 64.0 * mb, wan, budget));
        // ...unless 2 MB beyond what the link holds are queued: the guest dirties more
        // pages while they drain.
        assert!(!fits_downtime(1.0 * mb, 3.6 * mb, 80.0 * mb, 64.0 * mb, wan, budget));
        assert!(fits_downtime(1.0 * mb, 1.6 * mb, 80.0 * mb, 64.0 * mb, wan, budget));
        // A round trip longer than the budget never fits (the throttle and the round limit end
        // the pre-copy then).
        assert!(!fits_downtime(
            0.0,
            0.0,
            80.0 * mb,
            0.0,
            Duration::from_millis(60),
            budget
        ));
    }

    fn facts(round: u32, dirty_pages: u64, sent_last_round: u64) -> RoundFacts {
        RoundFacts {
            round,
            dirty_pages,
            sent_last_round,
            bandwidth: 100e6,
            dirty_rate: 10e6,
            max_downtime: Duration::from_millis(50),
            max_rounds: 30,
            throttle_allowed: true,
            ..RoundFacts::default()
        }
    }

    #[test]
    fn a_shrinking_dirty_set_converges_and_a_stuck_one_is_throttled_then_switched() {
        let policy = PrecopyPolicy::new();
        // 40 MB dirty at 100 MB/s does not fit 50 ms: another round.
        assert_eq!(policy.decide(&facts(0, 10_000, 60_000)), Convergence::NextRound);
        // 400 pages (1.6 MB) fit, but the last round sent 10,000: one more may halve them.
        assert_eq!(policy.decide(&facts(1, 400, 10_000)), Convergence::NextRound);
        // 300 left after a round of 400 no longer halves: stop-and-copy.
        assert_eq!(policy.decide(&facts(2, 300, 400)), Convergence::StopAndCopy);

        // A new migration (round 0) forgets the last one. A dirty set that stops shrinking is
        // throttled after two rounds without progress...
        let stuck = |round| facts(round, 20_000, 20_000);
        assert_eq!(policy.decide(&stuck(0)), Convergence::NextRound);
        assert_eq!(policy.decide(&stuck(1)), Convergence::NextRound);
        assert_eq!(policy.decide(&stuck(2)), Convergence::Throttle);
        // ...and switched to post-copy when the migration allows it.
        let mut switchable = stuck(3);
        switchable.postcopy_allowed = true;
        assert_eq!(
            policy.decide(&switchable),
            Convergence::NextRound,
            "progress was reset by the throttle"
        );
        switchable.round = 4;
        assert_eq!(policy.decide(&switchable), Convergence::NextRound);
        switchable.round = 5;
        assert_eq!(policy.decide(&switchable), Convergence::PostCopy);
        // The provider's bound on rounds ends any pre-copy.
        assert_eq!(policy.decide(&facts(30, 20_000, 20_000)), Convergence::StopAndCopy);
    }
}
