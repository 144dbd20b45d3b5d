//! `FrameReader` over arbitrary bytes: the hello, then frames until the
//! first error. Never a panic; every accepted message re-encodes to a frame
//! that decodes to the same message.

#![no_main]

use libfuzzer_sys::fuzz_target;
use vmsync::wire::{FrameReader, Msg};

fuzz_target!(|data: &[u8]| {
    let _ = FrameReader::new(data, "fuzz").read_hello();

    let mut reader = FrameReader::new(data, "fuzz");
    // Each frame takes at least 5 bytes, so this always ends.
    for _ in 0..=data.len() / 5 {
        let Ok(msg) = reader.read_msg() else { break };
        let mut buf = Vec::new();
        msg.encode(&mut buf);
        let again = Msg::decode(&buf).expect("a decoded message re-encodes to a valid frame");
        assert_eq!(again, msg, "re-encoding changed the message");
    }
});
