//! Character-level vocabulary.
//!
//! The vocabulary is the sorted set of Unicode scalar values of the corpus, so
//! the same text always gives the same ids on every replica. It travels in the
//! handshake and in checkpoints, next to the weights it belongs to.

use alloc::collections::BTreeSet;
use alloc::string::String;
use alloc::vec::Vec;

use crate::error::{Error, Result};

/// A token id. u16 keeps minibatches small on the wire (65,536 characters is
/// far beyond any character-level corpus).
pub type Token = u16;

/// Maps characters to token ids and back.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tokenizer {
    /// Sorted, distinct characters; a token id is an index into this.
    chars: Vec<char>,
}

impl Tokenizer {
    /// Builds the vocabulary of `corpus`.
    pub fn from_corpus(corpus: &str) -> Result<Self> {
        let set: BTreeSet<char> = corpus.chars().collect();
        Self::from_chars(set.into_iter().collect())
    }

    /// Rebuilds a tokenizer from its character list, e.g. one read from a
    /// checkpoint or the wire. Refuses unsorted or repeated characters, so a
    /// tokenizer always has exactly one valid id per character.
    pub fn from_chars(chars: Vec<char>) -> Result<Self> {
        if chars.len() > crate::config::limits::MAX_VOCAB as usize {
            return Err(Error::Config("vocabulary larger than 65536".into()));
        }
        if chars.windows(2).any(|w| w[0] >= w[1]) {
            return Err(Error::Config("vocabulary must be sorted and distinct".into()));
        }
        Ok(Self { chars })
    }

    /// The characters, in id order.
    pub fn chars(&self) -> &[char] {
        &self.chars
    }

    /// Number of tokens.
    pub fn len(&self) -> usize {
        self.chars.len()
    }

    /// True for the empty vocabulary (only from an empty corpus).
    pub fn is_empty(&self) -> bool {
        self.chars.is_empty()
    }

    /// Id of one character.
    pub fn id(&self, c: char) -> Result<Token> {
        self.chars
            .binary_search(&c)
            .map(|i| i as Token)
            .map_err(|_| Error::UnknownChar(c))
    }

    /// Encodes text; fails on the first character outside the vocabulary.
    pub fn encode(&self, text: &str) -> Result<Vec<Token>> {
        text.chars().map(|c| self.id(c)).collect()
    }

    /// Decodes ids; fails on an id outside the vocabulary.
    pub fn decode(&self, tokens: &[Token]) -> Result<String> {
        tokens
            .iter()
            .map(|&t| {
                self.chars
                    .get(t as usize)
                    .copied()
                    .ok_or(Error::UnknownToken(t as u32))
            })
            .collect()
    }
}

impl TryFrom<Vec<char>> for Tokenizer {
    type Error = Error;

    fn try_from(chars: Vec<char>) -> Result<Self> {
        Self::from_chars(chars)
    }
}

impl From<Tokenizer> for Vec<char> {
    fn from(t: Tokenizer) -> Self {
        t.chars
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_follow_sorted_order() {
        let t = Tokenizer::from_corpus("banana").unwrap();
        assert_eq!(t.chars(), &['a', 'b', 'n']);
        assert_eq!(t.encode("nab").unwrap(), [2, 0, 1]);
        assert_eq!(t.decode(&[1, 0, 2]).unwrap(), "ban");
    }

    #[test]
    fn unknown_input_is_an_error() {
        let t = Tokenizer::from_corpus("abc").unwrap();
        assert_eq!(t.encode("abz"), Err(Error::UnknownChar('z')));
        assert_eq!(t.decode(&[0, 3]), Err(Error::UnknownToken(3)));
        assert!(Tokenizer::from_chars(alloc::vec!['b', 'a']).is_err());
    }
}
