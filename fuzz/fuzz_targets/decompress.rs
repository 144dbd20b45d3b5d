//! `compress::StreamDecoder` over arbitrary payloads, several chunks in a
//! row on one stream (as on a connection). Never a panic, never a byte
//! written outside the output slice, never more than it.
//!
//! Input: a sequence of (u16 LE output length, u16 LE payload length,
//! payload) records.

#![no_main]

use libfuzzer_sys::fuzz_target;
use vmsync::content::compress::StreamDecoder;

const CANARY: u8 = 0xa5;
const GUARD: usize = 64;

fuzz_target!(|data: &[u8]| {
    let mut dec = StreamDecoder::new().unwrap();
    let mut rest = data;
    while rest.len() >= 4 {
        let want = usize::from(u16::from_le_bytes([rest[0], rest[1]]));
        let n = usize::from(u16::from_le_bytes([rest[2], rest[3]])).min(rest.len() - 4);
        let payload = &rest[4..4 + n];
        rest = &rest[4 + n..];
        let mut buf = vec![CANARY; GUARD + want + GUARD];
        let r = dec.decode(payload, &mut buf[GUARD..GUARD + want]);
        assert!(
            buf[..GUARD].iter().all(|&b| b == CANARY),
            "wrote before the output"
        );
        assert!(
            buf[GUARD + want..].iter().all(|&b| b == CANARY),
            "wrote past the output"
        );
        if r.is_err() {
            // A real receiver ends the connection here.
            break;
        }
    }
});
