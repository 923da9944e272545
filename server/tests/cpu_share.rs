//! `seedling worker --cpu-percent 25` holds the worker to about a quarter
//! of a core: the native evaluation, kept busy for a few seconds under the
//! process's CPU share, uses about 25 % of the wall clock in CPU time.
//!
//! A file of its own because the share is process-wide: no other test in
//! this process may evaluate under it. The band is wide on purpose (this is
//! not a timing test). The time the thread spent ready but waiting for a
//! core (the kernel's run-queue wait) is taken out of the wall clock: at
//! nice 19 on a loaded machine the worker waits for a core most of the
//! time, and that says nothing of its duty cycle.

#![cfg(target_os = "linux")]

use std::time::{Duration, Instant};

use seedling_core::batch::step_batch;
use seedling_core::tokenizer::Tokenizer;
use seedling_core::{Replica, RunConfig};
use seedling_server::duty::CPU_SHARE;
use seedling_server::worker::evaluate_parallel;

/// This thread's time on a core and time ready but waiting for one, from
/// the kernel's scheduler statistics.
fn thread_sched() -> (Duration, Duration) {
    let text = std::fs::read_to_string("/proc/thread-self/schedstat").unwrap();
    let mut ns = text.split_whitespace().map(|x| x.parse::<u64>().unwrap());
    let (on_cpu, waiting) = (ns.next().unwrap(), ns.next().unwrap());
    (Duration::from_nanos(on_cpu), Duration::from_nanos(waiting))
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
    // One thread: the job is evaluated on this one, which the statistics
    // below are of.
    let ((cpu0, wait0), wall0) = (thread_sched(), Instant::now());
    let mut jobs = 0;
    while wall0.elapsed() < Duration::from_secs(3) {
        let losses = evaluate_parallel(&replica, &tokens, &members, 1).unwrap();
        assert_eq!(losses.len(), members.len());
        jobs += 1;
    }
    let wall = wall0.elapsed();
    let (cpu1, wait1) = thread_sched();
    let fraction = (cpu1 - cpu0).as_secs_f64() / (wall - (wait1 - wait0)).as_secs_f64();
    CPU_SHARE.set_percent(100);
    eprintln!("busy {fraction:.3} of the wall clock it could run over {jobs} jobs at 25 %");
    assert!(
        (0.1..=0.45).contains(&fraction),
        "busy {fraction:.3} of the wall clock it could run over {jobs} jobs at 25 %"
    );
}
