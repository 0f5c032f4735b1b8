//! The framing and the primitive encoding of a saved device state.
//!
//! A blob is a 24-byte header followed by the payload:
//!
//! | bytes | field                                                  |
//! |-------|--------------------------------------------------------|
//! | 0..8  | magic, `VRDMAST\0`                                     |
//! | 8..12 | format version, little-endian (1 today)                |
//! | 12..16| CRC-32 (IEEE) of the payload, little-endian            |
//! | 16..24| payload length in bytes, little-endian                 |
//!
//! The payload is a sequence of little-endian integers, bytes and counted lists whose layout
//! each version defines (`v1.rs`). Every read is bounds-checked and every count is checked
//! against a limit before anything is allocated for it, so a corrupt or hostile blob costs
//! at most its own size.

/// The first bytes of every saved state.
pub const MAGIC: [u8; 8] = *b"VRDMAST\0";
/// Bytes before the payload.
pub const HEADER_LEN: usize = 24;
/// The largest payload a daemon accepts: far above what 64 Ki QPs and 1 Mi MRs with full page
/// lists need, and a bound on what a frontend can make the loader hold.
pub const MAX_PAYLOAD: u64 = 1 << 32;

/// Why a saved state could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// Not a vrdma device state.
    #[error(
        "the device state does not start with vrdma's magic number: the frontend sent another device's state or a corrupt stream"
    )]
    Magic,
    /// Written by a newer daemon.
    #[error(
        "the device state is format version {found}, and this daemon reads versions up to {supported}: run the same or a newer vhost-user-rdma on the destination"
    )]
    Version {
        /// Version in the blob.
        found: u32,
        /// Newest this daemon reads.
        supported: u32,
    },
    /// The stream ended early or has bytes after the payload.
    #[error(
        "the device state is {found} bytes where its header promises {expected}: the transfer was cut short or corrupted"
    )]
    Length {
        /// Bytes the header announces (header included).
        expected: u64,
        /// Bytes received.
        found: u64,
    },
    /// The payload does not match its checksum.
    #[error(
        "the device state's checksum is {found:#010x}, not the {expected:#010x} its header records: the transfer corrupted it"
    )]
    Checksum {
        /// In the header.
        expected: u32,
        /// Computed.
        found: u32,
    },
    /// The payload ends in the middle of a field.
    #[error("the device state ends inside {0}")]
    Truncated(&'static str),
    /// A count is larger than the format allows.
    #[error("the device state has {count} {what}, more than the {max} allowed")]
    Count {
        /// What is counted.
        what: &'static str,
        /// Count found.
        count: u64,
        /// Most allowed.
        max: u64,
    },
    /// A field has a value no daemon writes.
    #[error("the device state has an invalid {0}")]
    Field(&'static str),
    /// The payload has bytes after its last field.
    #[error("the device state has {0} bytes after its last field")]
    Trailing(usize),
}

/// Wraps `payload` in the header of format `version`.
pub fn frame(version: u32, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&version.to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(payload).to_le_bytes());
    out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    out.extend_from_slice(payload);
    out
}

/// Checks the header of `blob` and returns its version and payload. `newest` is the newest
/// version the caller reads.
pub fn unframe(blob: &[u8], newest: u32) -> Result<(u32, &[u8]), Error> {
    let too_short = || Error::Length {
        expected: HEADER_LEN as u64,
        found: blob.len() as u64,
    };
    let header = blob.get(..HEADER_LEN).ok_or_else(too_short)?;
    if header[..8] != MAGIC {
        return Err(Error::Magic);
    }
    let word = |at: usize| u32::from_le_bytes(header[at..at + 4].try_into().unwrap_or_default());
    let version = word(8);
    if version == 0 || version > newest {
        return Err(Error::Version {
            found: version,
            supported: newest,
        });
    }
    let expected_crc = word(12);
    let len = u64::from_le_bytes(header[16..24].try_into().unwrap_or_default());
    let payload = &blob[HEADER_LEN..];
    if len > MAX_PAYLOAD || len != payload.len() as u64 {
        return Err(Error::Length {
            expected: (HEADER_LEN as u64).saturating_add(len),
            found: blob.len() as u64,
        });
    }
    let crc = crc32fast::hash(payload);
    if crc != expected_crc {
        return Err(Error::Checksum {
            expected: expected_crc,
            found: crc,
        });
    }
    Ok((version, payload))
}

/// Appends fields to a payload.
#[derive(Debug, Default)]
pub struct Writer {
    buf: Vec<u8>,
}

impl Writer {
    /// The payload so far.
    pub fn into_bytes(self) -> Vec<u8> {
        self.buf
    }

    /// One byte.
    pub fn u8(&mut self, v: u8) {
        self.buf.push(v);
    }

    /// A flag, as 0 or 1.
    pub fn bool(&mut self, v: bool) {
        self.buf.push(u8::from(v));
    }

    /// A 32-bit word.
    pub fn u32(&mut self, v: u32) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }

    /// A 64-bit word.
    pub fn u64(&mut self, v: u64) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }

    /// A count of what follows.
    pub fn count(&mut self, n: usize) {
        self.u32(u32::try_from(n).unwrap_or(u32::MAX));
    }

    /// Bytes, counted.
    pub fn bytes(&mut self, v: &[u8]) {
        self.count(v.len());
        self.buf.extend_from_slice(v);
    }

    /// An optional word: a flag, then the word if present.
    pub fn opt_u32(&mut self, v: Option<u32>) {
        self.bool(v.is_some());
        if let Some(v) = v {
            self.u32(v);
        }
    }

    /// An optional 64-bit word.
    pub fn opt_u64(&mut self, v: Option<u64>) {
        self.bool(v.is_some());
        if let Some(v) = v {
            self.u64(v);
        }
    }
}

/// Reads fields from a payload, every read checked.
#[derive(Debug)]
pub struct Reader<'a> {
    rest: &'a [u8],
}

impl<'a> Reader<'a> {
    /// A reader over `payload`.
    pub fn new(payload: &'a [u8]) -> Self {
        Reader { rest: payload }
    }

    /// Fails unless every byte was read.
    pub fn finish(self) -> Result<(), Error> {
        if self.rest.is_empty() {
            Ok(())
        } else {
            Err(Error::Trailing(self.rest.len()))
        }
    }

    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], Error> {
        if self.rest.len() < n {
            return Err(Error::Truncated(what));
        }
        let (head, tail) = self.rest.split_at(n);
        self.rest = tail;
        Ok(head)
    }

    /// One byte.
    pub fn u8(&mut self, what: &'static str) -> Result<u8, Error> {
        Ok(self.take(1, what)?[0])
    }

    /// A flag: 0 or 1, anything else is corrupt.
    pub fn bool(&mut self, what: &'static str) -> Result<bool, Error> {
        match self.u8(what)? {
            0 => Ok(false),
            1 => Ok(true),
            _ => Err(Error::Field(what)),
        }
    }

    /// A 32-bit word.
    pub fn u32(&mut self, what: &'static str) -> Result<u32, Error> {
        let b = self.take(4, what)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    /// A 64-bit word.
    pub fn u64(&mut self, what: &'static str) -> Result<u64, Error> {
        let b = self.take(8, what)?;
        let mut w = [0u8; 8];
        w.copy_from_slice(b);
        Ok(u64::from_le_bytes(w))
    }

    /// A count of at most `max`. Also refuses counts the bytes left cannot hold at
    /// `min_each` bytes per item, so nothing is allocated for items that are not there.
    pub fn count(
        &mut self,
        what: &'static str,
        max: usize,
        min_each: usize,
    ) -> Result<usize, Error> {
        let n = self.u32(what)? as usize;
        let fits = self.rest.len() / min_each.max(1);
        if n > max || n > fits {
            return Err(Error::Count {
                what,
                count: n as u64,
                max: max.min(fits) as u64,
            });
        }
        Ok(n)
    }

    /// Counted bytes, at most `max`.
    pub fn bytes(&mut self, what: &'static str, max: usize) -> Result<&'a [u8], Error> {
        let n = self.count(what, max, 1)?;
        self.take(n, what)
    }

    /// Exactly `n` bytes, counted: a fixed-size field written as bytes.
    pub fn exact(&mut self, what: &'static str, n: usize) -> Result<&'a [u8], Error> {
        let b = self.bytes(what, n)?;
        if b.len() != n {
            return Err(Error::Field(what));
        }
        Ok(b)
    }

    /// An optional word.
    pub fn opt_u32(&mut self, what: &'static str) -> Result<Option<u32>, Error> {
        Ok(if self.bool(what)? {
            Some(self.u32(what)?)
        } else {
            None
        })
    }

    /// An optional 64-bit word.
    pub fn opt_u64(&mut self, what: &'static str) -> Result<Option<u64>, Error> {
        Ok(if self.bool(what)? {
            Some(self.u64(what)?)
        } else {
            None
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_frame_round_trips_and_each_header_fault_is_named() {
        let blob = frame(1, b"payload");
        assert_eq!(unframe(&blob, 1), Ok((1, &b"payload"[..])));

        let mut bad = blob.clone();
        bad[0] ^= 1;
        assert_eq!(unframe(&bad, 1), Err(Error::Magic));

        let future = frame(2, b"payload");
        assert_eq!(
            unframe(&future, 1),
            Err(Error::Version {
                found: 2,
                supported: 1
            })
        );
        assert!(matches!(
            unframe(&frame(0, b""), 1),
            Err(Error::Version { found: 0, .. })
        ));

        let mut flipped = blob.clone();
        *flipped.last_mut().unwrap() ^= 0x80;
        assert!(matches!(unframe(&flipped, 1), Err(Error::Checksum { .. })));

        assert!(matches!(
            unframe(&blob[..blob.len() - 1], 1),
            Err(Error::Length { .. })
        ));
        let mut longer = blob.clone();
        longer.push(0);
        assert!(matches!(unframe(&longer, 1), Err(Error::Length { .. })));
        assert!(matches!(unframe(&blob[..10], 1), Err(Error::Length { .. })));
    }

    #[test]
    fn reads_are_checked() {
        let mut w = Writer::default();
        w.u32(7);
        w.bool(true);
        w.opt_u64(Some(9));
        w.bytes(b"abc");
        w.u8(2);
        let bytes = w.into_bytes();
        let mut r = Reader::new(&bytes);
        assert_eq!(r.u32("a"), Ok(7));
        assert_eq!(r.bool("b"), Ok(true));
        assert_eq!(r.opt_u64("c"), Ok(Some(9)));
        assert_eq!(r.bytes("d", 3), Ok(&b"abc"[..]));
        assert_eq!(r.bool("e"), Err(Error::Field("e")), "2 is not a flag");
        assert_eq!(r.u8("f"), Err(Error::Truncated("f")));

        // A count the remaining bytes cannot hold is refused before any allocation.
        let mut w = Writer::default();
        w.count(1_000_000);
        let bytes = w.into_bytes();
        assert!(matches!(
            Reader::new(&bytes).count("items", usize::MAX, 8),
            Err(Error::Count {
                count: 1_000_000,
                ..
            })
        ));
        let mut r = Reader::new(&[1, 0, 0, 0, 0xaa]);
        assert_eq!(
            r.bytes("x", 0),
            Err(Error::Count {
                what: "x",
                count: 1,
                max: 0
            })
        );
    }
}
