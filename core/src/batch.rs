//! Minibatch selection from a token stream.
//!
//! The training text is cut into packed windows of `seq_len + 1` tokens (no
//! padding). Step s draws its windows from a stream keyed by (run seed, s),
//! so a restarted server picks the same minibatches and a resumed run
//! matches an uninterrupted one.

use alloc::vec::Vec;

use crate::error::{Error, Result};
use crate::rng::{DOMAIN_BATCH, Stream, derive};
use crate::tokenizer::Token;
use rand_core::Rng;

/// Number of whole windows of `seq_len + 1` tokens in `n_tokens`.
pub fn window_count(n_tokens: usize, seq_len: usize) -> usize {
    n_tokens / (seq_len + 1)
}

/// The window indices of step `step`: `batch` draws, uniform over the windows.
pub fn step_windows(seed: u64, step: u64, windows: usize, batch: usize) -> Result<Vec<usize>> {
    if windows == 0 {
        return Err(Error::Config("corpus is shorter than one sequence".into()));
    }
    let mut rng = Stream::new(derive(&[DOMAIN_BATCH, seed, step]));
    // Lemire's multiply-shift: uniform enough for 2^64 / windows >> 1.
    Ok((0..batch)
        .map(|_| ((rng.next_u64() as u128 * windows as u128) >> 64) as usize)
        .collect())
}

/// Copies windows out of the token stream into one minibatch buffer.
pub fn gather(tokens: &[Token], windows: &[usize], seq_len: usize) -> Vec<Token> {
    let w = seq_len + 1;
    let mut out = Vec::with_capacity(windows.len() * w);
    for &i in windows {
        out.extend_from_slice(&tokens[i * w..(i + 1) * w]);
    }
    out
}

/// The minibatch of step `step` from a token stream.
pub fn step_batch(
    tokens: &[Token],
    seed: u64,
    step: u64,
    batch: usize,
    seq_len: usize,
) -> Result<Vec<Token>> {
    let windows = step_windows(seed, step, window_count(tokens.len(), seq_len), batch)?;
    Ok(gather(tokens, &windows, seq_len))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_are_in_range_and_reproducible() {
        let a = step_windows(1, 5, 10, 64).unwrap();
        assert_eq!(a, step_windows(1, 5, 10, 64).unwrap());
        assert_ne!(a, step_windows(1, 6, 10, 64).unwrap());
        assert!(a.iter().all(|&w| w < 10));
        assert!(step_windows(1, 5, 0, 1).is_err());
        let toks: Vec<Token> = (0..20).collect();
        assert_eq!(gather(&toks, &[1, 0], 3), [4, 5, 6, 7, 0, 1, 2, 3]);
    }
}
