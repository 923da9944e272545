//! The browser's side of the shared protocol state machine, free of
//! JavaScript.
//!
//! What to do with each server message is decided by
//! [`seedling_core::session`], the same module the native worker uses, so
//! the coordinator cannot tell the two apart except by the `kind` and
//! `threads` in the Hello. This module only adds what is the browser's own:
//! its Hello (one Web Worker is one thread), evaluating a job right here,
//! and text samples for the page. It compiles and is unit-tested natively;
//! the browser tests drive it through the exported handle.

use seedling_core::Result;
use seedling_core::generate::sample_text;
use seedling_core::protocol::{ClientKind, SessionToken};
use seedling_core::rng::{DOMAIN_SAMPLE, Stream, derive};
pub use seedling_core::session::{Reaction, Session, Work};

/// The handshake: a browser volunteer evaluating one member stream at a
/// time (one Web Worker is one thread), with an optional speed estimate in
/// members per second from an earlier connection (0 = unknown) so the
/// server can size the first job, and the session token of an earlier
/// connection so the trust it earned carries over.
pub fn hello(speed: f32, session: Option<SessionToken>) -> Result<Vec<u8>> {
    seedling_core::session::hello(ClientKind::Browser, 1, speed, session)
}

/// The reply to a job, evaluated on this Web Worker's one thread (the
/// worker has nothing else to do meanwhile; the next frames queue behind).
pub fn answer(work: &Work) -> Result<Vec<u8>> {
    work.reply(work.evaluate()?)
}

/// `len` characters sampled at `temperature` from the session's current
/// weights, after a one-character prompt (a newline when the vocabulary has
/// one, as at the start of a paragraph). The random stream is keyed by run
/// and step, so a sample is reproducible but changes as the model trains,
/// and two runs at the same step do not print the same sample. `None`
/// before the first snapshot.
pub fn sample(session: &Session, len: usize, temperature: f32) -> Result<Option<String>> {
    let (Some(replica), Some(tokenizer)) = (session.replica(), session.tokenizer()) else {
        return Ok(None);
    };
    let prompt = tokenizer.id('\n').unwrap_or(0);
    let mut rng = Stream::new(derive(&[DOMAIN_SAMPLE, session.run(), replica.step]));
    let tokens = sample_text(
        &replica.layout,
        &replica.params,
        &[prompt],
        len,
        temperature,
        0,
        &mut rng,
    )?;
    tokenizer.decode(&tokens).map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;
    use seedling_core::protocol::{self, ClientMsg, MAX_SERVER_MESSAGE, PROTOCOL_VERSION, ServerMsg};
    use seedling_core::tokenizer::Tokenizer;
    use seedling_core::{Replica, RunConfig};

    fn server(msg: &ServerMsg) -> Vec<u8> {
        protocol::encode(msg, MAX_SERVER_MESSAGE).unwrap()
    }

    #[test]
    fn hello_announces_a_browser_at_this_protocol_version() {
        let msg = protocol::decode_client(&hello(f32::NAN, Some([3; 16])).unwrap()).unwrap();
        assert_eq!(
            msg,
            ClientMsg::Hello {
                version: PROTOCOL_VERSION,
                kind: ClientKind::Browser,
                threads: 1,
                speed: 0.0,
                session: Some([3; 16]),
            }
        );
    }

    #[test]
    fn answers_jobs_and_samples_text_once_a_snapshot_arrived() {
        // The reference workload: the page's real model size, still quick.
        let tokenizer = Tokenizer::from_corpus("abc\nde").unwrap();
        let config = RunConfig::rw256(tokenizer.len() as u32);
        let want = Replica::new(config).unwrap();
        let mut s = Session::new();
        let welcome = ServerMsg::Welcome {
            run: 7,
            client: 1,
            session: [9; 16],
            config,
            tokenizer,
        };
        s.receive(&server(&welcome)).unwrap();
        assert_eq!(sample(&s, 10, 0.8).unwrap(), None, "no weights yet");
        let snap = ServerMsg::Snapshot {
            step: 0,
            params: want.params.clone(),
            adam: want.adam.clone(),
        };
        s.receive(&server(&snap)).unwrap();
        let tokens = vec![1u16; config.batch_tokens()];
        let job = ServerMsg::Job {
            step: 0,
            job: 3,
            members: vec![2, 3],
            tokens: tokens.clone(),
            deadline_ms: 1000,
        };
        let Reaction::Evaluate(work) = s.receive(&server(&job)).unwrap() else {
            panic!("a job at the replica's step is handed out to evaluate");
        };
        assert_eq!(
            protocol::decode_client(&answer(&work).unwrap()).unwrap(),
            ClientMsg::Losses {
                step: 0,
                job: 3,
                losses: want.evaluate(&tokens, &[2, 3]).unwrap()
            }
        );
        let text = sample(&s, 40, 0.8).unwrap().unwrap();
        assert_eq!(text.chars().count(), 40);
        // The same run and step give the same text.
        assert_eq!(sample(&s, 40, 0.8).unwrap().unwrap(), text);
    }
}
