//! The browser's part of the volunteer lifecycle, free of JavaScript.
//!
//! The lifecycle itself ([`seedling_core::volunteer`]) is the one the native
//! worker drives, so the coordinator cannot tell the two apart except by the
//! `kind` and `threads` in the Hello. This module only adds what is the
//! browser's own: its profile (one Web Worker is one thread, and it tells
//! the server its speed), evaluating a job right here, and text samples for
//! the page. [`frame`] is the whole of what the WebSocket's message handler
//! computes for a frame; it compiles and is tested natively (the native
//! worker's tests compare its replies with the native worker's), and the
//! browser tests drive it through the exported handle.

use seedling_core::Result;
use seedling_core::generate::sample_text;
use seedling_core::protocol::{ClientKind, SessionToken};
use seedling_core::rng::{DOMAIN_SAMPLE, Stream, derive};
pub use seedling_core::volunteer::{Action, Event, Outcome, Volunteer, Work};

/// A browser volunteer that has not connected yet: it evaluates one member
/// stream at a time (one Web Worker is one thread), and its Hello carries
/// its measured speed in members per second so the server can size the
/// first job of a reconnection.
pub fn volunteer() -> Volunteer {
    Volunteer::new(ClientKind::Browser, 1).announce_speed()
}

/// The browser volunteer `life` resumed as the contributor the page kept
/// in `localStorage`: `token` as [`token_hex`] wrote it (anything else, or
/// `None`, is a new contributor) and the display `name` (cleaned as the
/// server requires).
pub fn with_identity(life: Volunteer, token: Option<&str>, name: &str) -> Volunteer {
    life.identity(token.and_then(parse_token), name)
}

/// A session token as 32 lowercase hex digits, the form the page stores.
pub fn token_hex(token: &SessionToken) -> String {
    token.iter().map(|b| format!("{b:02x}")).collect()
}

/// [`token_hex`]'s form read back; `None` if it is not 32 hex digits.
pub fn parse_token(hex: &str) -> Option<SessionToken> {
    let hex = hex.trim();
    if hex.len() != 32 || !hex.is_ascii() {
        return None;
    }
    let mut token = [0u8; 16];
    for (i, b) in token.iter_mut().enumerate() {
        *b = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(token)
}

/// What the browser does with one server frame at `now_ms`: the lifecycle
/// reacts, and a job is evaluated right here (the worker has nothing else
/// to do meanwhile; the next frames queue behind) and its reply handed
/// back. The outcome left is for the transport: send, close, stop.
pub fn frame(life: &mut Volunteer, bytes: &[u8], now_ms: u64) -> Outcome {
    let outcome = life.receive(bytes);
    match outcome.action {
        Action::Evaluate(work) => evaluate(life, work, now_ms),
        action => Outcome { action, ..outcome },
    }
}

/// Evaluates a job on this Web Worker's one thread and hands the losses
/// back to the lifecycle.
pub fn evaluate(life: &mut Volunteer, work: Work, now_ms: u64) -> Outcome {
    let losses = work.evaluate();
    life.evaluated(work, losses, now_ms)
}

/// `len` characters sampled at `temperature` from the volunteer's current
/// weights, after a one-character prompt (a newline when the vocabulary has
/// one, as at the start of a paragraph). The random stream is keyed by run
/// and step, so a sample is reproducible but changes as the model trains,
/// and two runs at the same step do not print the same sample. `None`
/// before the first snapshot.
pub fn sample(life: &Volunteer, len: usize, temperature: f32) -> Result<Option<String>> {
    let session = life.session();
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

    fn sent(outcome: &Outcome) -> ClientMsg {
        let Action::Send(bytes) = &outcome.action else {
            panic!("not a Send: {outcome:?}");
        };
        protocol::decode_client(bytes).unwrap()
    }

    #[test]
    fn hello_announces_a_browser_at_this_protocol_version() {
        let mut v = volunteer();
        assert_eq!(
            sent(&v.opened(0)),
            ClientMsg::Hello {
                version: PROTOCOL_VERSION,
                kind: ClientKind::Browser,
                threads: 1,
                speed: 0.0,
                session: None,
                name: String::new(),
            }
        );
    }

    /// A stored token and name go into the Hello; a damaged token is a new
    /// contributor, not an error.
    #[test]
    fn a_stored_identity_goes_into_the_hello() {
        let token = [0x5a; 16];
        assert_eq!(parse_token(&token_hex(&token)), Some(token));
        for bad in ["", "xyz", &"g".repeat(32), &"5a".repeat(17)] {
            assert_eq!(parse_token(bad), None, "{bad:?}");
        }
        let mut v = with_identity(volunteer(), Some(&token_hex(&token)), " ada\u{202e} ");
        let ClientMsg::Hello { session, name, .. } = sent(&v.opened(0)) else {
            panic!("not a Hello");
        };
        assert_eq!((session, name.as_str()), (Some(token), "ada"));
        let mut v = with_identity(volunteer(), Some("garbage"), "");
        let ClientMsg::Hello { session, .. } = sent(&v.opened(0)) else {
            panic!("not a Hello");
        };
        assert_eq!(session, None);
    }

    #[test]
    fn answers_jobs_and_samples_text_once_a_snapshot_arrived() {
        // The reference workload: the page's real model size, still quick.
        let tokenizer = Tokenizer::from_corpus("abc\nde").unwrap();
        let config = RunConfig::rw256(tokenizer.len() as u32);
        let want = Replica::new(config).unwrap();
        let mut v = volunteer();
        v.opened(0);
        let welcome = ServerMsg::Welcome {
            run: 7,
            client: 1,
            session: [9; 16],
            config,
            tokenizer,
        };
        assert!(matches!(
            frame(&mut v, &server(&welcome), 0).action,
            Action::Nothing
        ));
        assert_eq!(sample(&v, 10, 0.8).unwrap(), None, "no weights yet");
        let snap = want.snapshot();
        frame(&mut v, &server(&snap), 0);
        let tokens = vec![1u16; config.batch_tokens()];
        let job = ServerMsg::Job {
            step: 0,
            version: 0,
            floating: false,
            job: 3,
            members: vec![2, 3],
            tokens: tokens.clone(),
            deadline_ms: 1000,
        };
        let answered = frame(&mut v, &server(&job), 1_000);
        assert_eq!(
            sent(&answered),
            ClientMsg::Losses {
                step: 0,
                job: 3,
                behind: 0,
                losses: want.evaluate(&tokens, &[2, 3]).unwrap()
            }
        );
        assert!(matches!(
            answered.event,
            Some(Event::Evaluated { step: 0, members: 2 })
        ));
        let text = sample(&v, 40, 0.8).unwrap().unwrap();
        assert_eq!(text.chars().count(), 40);
        // The same run and step give the same text.
        assert_eq!(sample(&v, 40, 0.8).unwrap().unwrap(), text);
        // The next Hello carries the session token and the measured speed.
        let ClientMsg::Hello { session, speed, .. } =
            protocol::decode_client(&v.hello(2_000).unwrap()).unwrap()
        else {
            panic!("not a Hello");
        };
        assert_eq!((session, speed), (Some([9; 16]), 2.0));
    }
}
