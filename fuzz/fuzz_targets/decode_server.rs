//! Any bytes a server (or an impostor) can send to a volunteer: decoding
//! never panics, and an accepted message survives a round trip.
#![no_main]

use libfuzzer_sys::fuzz_target;
use seedling_core::protocol::{self, MAX_SERVER_MESSAGE};

fuzz_target!(|data: &[u8]| {
    if let Ok(msg) = protocol::decode_server(data) {
        let again = protocol::encode(&msg, MAX_SERVER_MESSAGE).expect("an accepted message encodes");
        let back = protocol::decode_server(&again).expect("an accepted message decodes again");
        assert_eq!(protocol::encode(&back, MAX_SERVER_MESSAGE).unwrap(), again);
    }
});
