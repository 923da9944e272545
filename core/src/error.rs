//! The one error type of the core.
//!
//! Everything a replica receives can come from a hostile peer, so every check
//! that can fail on input returns one of these instead of panicking; callers
//! turn it into a rejection of the offending client.

use alloc::string::String;
use core::fmt;

/// Why the core refused an input.
#[derive(Clone, Debug, PartialEq)]
pub enum Error {
    /// A configuration value is outside the range the core supports.
    Config(String),
    /// Text contains a character that is not in the vocabulary.
    UnknownChar(char),
    /// A token id is not in the vocabulary.
    UnknownToken(u32),
    /// A buffer has the wrong length for the model or batch it is used with.
    Shape {
        /// What was being checked.
        what: &'static str,
        /// The length the model or batch requires.
        expected: usize,
        /// The length that was given.
        got: usize,
    },
    /// A member index is out of range or repeated.
    Member(u32),
    /// An update or snapshot is for a different step than the replica's.
    Step {
        /// The step the replica is at.
        expected: u64,
        /// The step the message was for.
        got: u64,
    },
    /// A loss or weight is NaN or infinite.
    NonFinite,
    /// A wire message could not be decoded or encoded.
    Wire(String),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Config(s) => write!(f, "invalid configuration: {s}"),
            Error::UnknownChar(c) => write!(f, "character {c:?} is not in the vocabulary"),
            Error::UnknownToken(t) => write!(f, "token {t} is not in the vocabulary"),
            Error::Shape { what, expected, got } => {
                write!(f, "{what}: expected length {expected}, got {got}")
            }
            Error::Member(m) => write!(f, "member {m} is out of range or repeated"),
            Error::Step { expected, got } => {
                write!(f, "message is for step {got}, replica is at step {expected}")
            }
            Error::NonFinite => write!(f, "a value is NaN or infinite"),
            Error::Wire(s) => write!(f, "wire message: {s}"),
        }
    }
}

impl core::error::Error for Error {}

/// Shorthand used across the core.
pub type Result<T> = core::result::Result<T, Error>;

/// Checks a buffer length, naming the buffer in the error.
pub(crate) fn check_len(what: &'static str, expected: usize, got: usize) -> Result<()> {
    if expected == got {
        Ok(())
    } else {
        Err(Error::Shape { what, expected, got })
    }
}
