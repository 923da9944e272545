//! Any bytes a volunteer can send: decoding never panics, and whatever it
//! accepts survives a round trip unchanged.
#![no_main]

use libfuzzer_sys::fuzz_target;
use seedling_core::protocol::{self, MAX_CLIENT_MESSAGE};

fuzz_target!(|data: &[u8]| {
    if let Ok(msg) = protocol::decode_client(data) {
        let again = protocol::encode(&msg, MAX_CLIENT_MESSAGE).expect("an accepted message encodes");
        let back = protocol::decode_client(&again).expect("an accepted message decodes again");
        assert_eq!(protocol::encode(&back, MAX_CLIENT_MESSAGE).unwrap(), again);
    }
});
