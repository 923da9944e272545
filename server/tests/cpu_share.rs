//! `seedling worker --cpu-percent 25` holds the worker to about a quarter
//! of a core: the native evaluation, kept busy for a few seconds under the
//! process's CPU share, uses about 25 % of the wall clock in CPU time.
//!
//! A file of its own because the share is process-wide: no other test in
//! this process may evaluate under it. The band is wide on purpose (this is
//! not a timing test): on a loaded machine the worker, at the lowest
//! priority, may get less than its share, and it never gets much more.

#![cfg(unix)]

use std::time::{Duration, Instant};

use seedling_core::batch::step_batch;
use seedling_core::tokenizer::Tokenizer;
use seedling_core::{Replica, RunConfig};
use seedling_server::duty::CPU_SHARE;
use seedling_server::worker::evaluate_parallel;

/// CPU time (user + system) of the whole process so far.
fn process_cpu() -> Duration {
    // SAFETY: getrusage only writes the struct it is given.
    let usage = unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        assert_eq!(libc::getrusage(libc::RUSAGE_SELF, &mut usage), 0);
        usage
    };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(usage.ru_utime) + tv(usage.ru_stime)
}

#[test]
fn a_quarter_share_uses_about_a_quarter_of_a_core() {
    let text = "To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer\n";
    let tokenizer = Tokenizer::from_corpus(text).unwrap();
    let corpus = tokenizer.encode(text).unwrap();
    let mut config = RunConfig::rw256(tokenizer.len() as u32);
    config.es.population = 64;
    config.es.batch = 1;
    config.es.seq_len = 32;
    let replica = Replica::new(config).unwrap();
    let tokens = step_batch(&corpus, config.seed, 0, 1, 32).unwrap();
    let members: Vec<u32> = (0..64).collect();

    CPU_SHARE.set_percent(25);
    let (cpu0, wall0) = (process_cpu(), Instant::now());
    let mut jobs = 0;
    while wall0.elapsed() < Duration::from_secs(3) {
        let losses = evaluate_parallel(&replica, &tokens, &members, 1).unwrap();
        assert_eq!(losses.len(), members.len());
        jobs += 1;
    }
    let fraction = (process_cpu() - cpu0).as_secs_f64() / wall0.elapsed().as_secs_f64();
    CPU_SHARE.set_percent(100);
    eprintln!("busy {fraction:.3} of the wall clock over {jobs} jobs at 25 %");
    assert!(
        (0.1..=0.45).contains(&fraction),
        "busy {fraction:.3} of the wall clock over {jobs} jobs at 25 %"
    );
}
