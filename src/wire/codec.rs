//! The byte-level helpers every message encoder and decoder shares.
//!
//! Integers are little-endian; a `bytes` field is a u32 length followed by
//! that many bytes. Decoding never trusts the peer: [`Rd`] checks every
//! length against what is left and against the field's limit before taking
//! it, and every failure is a protocol error ([`malformed`]), never a panic.

use anyhow::Result;

use crate::error::{fail, Exit};

/// Appends a `bytes` field: u32 length, then `b`.
pub fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    out.extend_from_slice(&(b.len() as u32).to_le_bytes());
    out.extend_from_slice(b);
}

/// A protocol error about a message that does not decode.
pub fn malformed(msg: impl std::fmt::Display) -> anyhow::Error {
    fail(
        Exit::Protocol,
        format!("protocol error: malformed message: {msg}"),
    )
}

/// `s` cut to at most `max` bytes, at a character boundary, so that a
/// message cut to its limit still decodes as UTF-8.
pub fn truncate_utf8(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// A cursor over a payload being decoded.
pub struct Rd<'a>(pub &'a [u8]);

impl<'a> Rd<'a> {
    pub fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        if self.0.len() < n {
            return Err(malformed("message truncated"));
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Ok(a)
    }
    pub fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }
    pub fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().unwrap()))
    }
    pub fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().unwrap()))
    }
    /// A `bytes` field of at most `limit` bytes.
    pub fn bytes(&mut self, limit: usize) -> Result<&'a [u8]> {
        let n = self.u32()? as usize;
        if n > limit {
            return Err(malformed(format!("field of {n} bytes (limit {limit})")));
        }
        self.take(n)
    }
    /// Whatever is left (a message whose last field runs to the frame's end).
    pub fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.0)
    }
    /// Bytes not consumed yet; a decoded message must leave none.
    pub fn left(&self) -> usize {
        self.0.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::exit_code_of;

    #[test]
    fn reads_what_was_put_and_refuses_more() {
        let mut out = Vec::new();
        put_bytes(&mut out, b"abc");
        out.extend_from_slice(&7u64.to_le_bytes());
        let mut r = Rd(&out);
        assert_eq!(r.bytes(3).unwrap(), b"abc");
        assert_eq!(r.u64().unwrap(), 7);
        assert_eq!(r.left(), 0);
        let e = r.u8().unwrap_err();
        assert_eq!(exit_code_of(&e), Exit::Protocol);
        let e = Rd(&out).bytes(2).unwrap_err();
        assert_eq!(exit_code_of(&e), Exit::Protocol);
    }

    #[test]
    fn truncation_keeps_characters_whole() {
        assert_eq!(truncate_utf8("abc", 5), "abc");
        assert_eq!(truncate_utf8("aé", 2), "a");
        assert_eq!(truncate_utf8("éé", 4), "éé");
    }
}
