//! `--check`: the payload pattern and its verification.
//!
//! Message `k` (counted from 1) of QP `q` holds a pattern derived from both: a seed from
//! `(q, k)` mixed by SplitMix64, then 8-byte little-endian words `seed + j * GOLDEN` for word
//! `j`, with the low bit of every byte set. Every message of a run differs from the one before
//! it at nearly every byte, so a stale message, a message at the wrong place or a torn one is
//! found at its first wrong byte; and no pattern byte is 0, so a cleared buffer (a message
//! that never landed) fails at its first byte. Filling and checking allocate nothing; they go
//! a word at a time.

/// The golden-ratio increment between the words of a message.
const GOLDEN: u64 = 0x9e37_79b9_7f4a_7c15;

/// The first word of message `k` of QP `q`.
fn seed(q: u32, k: u64) -> u64 {
    // SplitMix64's finaliser: neighbouring (q, k) give unrelated seeds.
    let mut z = (u64::from(q) << 48 ^ k).wrapping_add(GOLDEN);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Word `j` of the message with this seed, as bytes.
fn word(seed: u64, j: usize) -> [u8; 8] {
    (seed.wrapping_add((j as u64).wrapping_mul(GOLDEN)) | 0x0101_0101_0101_0101).to_le_bytes()
}

/// The byte at `offset` of message `k` of QP `q`.
pub fn byte_at(q: u32, k: u64, offset: usize) -> u8 {
    word(seed(q, k), offset / 8)[offset % 8]
}

/// Fills `buf` with the start of message `k` of QP `q` (`buf.len()` bytes).
pub fn fill(buf: &mut [u8], q: u32, k: u64) {
    let s = seed(q, k);
    let words = buf.len() / 8;
    let mut chunks = buf.chunks_exact_mut(8);
    for (j, c) in chunks.by_ref().enumerate() {
        c.copy_from_slice(&word(s, j));
    }
    let tail = chunks.into_remainder();
    let n = tail.len();
    if n > 0 {
        tail.copy_from_slice(&word(s, words)[..n]);
    }
}

/// The first byte where `buf` differs from message `k` of QP `q`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mismatch {
    /// Its offset in the message.
    pub offset: usize,
    /// The pattern's byte.
    pub expected: u8,
    /// The byte found.
    pub found: u8,
}

/// Checks that `buf` holds the start of message `k` of QP `q`.
pub fn verify(buf: &[u8], q: u32, k: u64) -> Result<(), Mismatch> {
    let s = seed(q, k);
    for (j, c) in buf.chunks(8).enumerate() {
        let w = word(s, j);
        if c != &w[..c.len()] {
            let i = c.iter().zip(w).position(|(a, b)| *a != b).unwrap_or(0);
            return Err(Mismatch {
                offset: j * 8 + i,
                expected: w[i],
                found: c[i],
            });
        }
    }
    Ok(())
}

/// What one side verified: messages and their bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Verified {
    /// Messages checked in full.
    pub messages: u64,
    /// Their bytes.
    pub bytes: u64,
}

impl Verified {
    /// One more message of `size` bytes.
    pub fn add(&mut self, size: usize) {
        self.messages += 1;
        self.bytes += size as u64;
    }

    /// Both sides' counts (`--loopback`).
    pub fn plus(self, other: Verified) -> Verified {
        Verified {
            messages: self.messages + other.messages,
            bytes: self.bytes + other.bytes,
        }
    }

    /// The line a successful checked run prints (VERIFIED_PREFIX, then the counts).
    pub fn line(&self) -> String {
        format!(
            "{VERIFIED_PREFIX}{} messages, {} bytes",
            self.messages, self.bytes
        )
    }
}

/// How the line [`Verified::line`] starts.
pub const VERIFIED_PREFIX: &str = "payloads verified: ";

/// Bytes of message slots per QP and direction that `--check` allows: it caps the TX depth
/// (and send_bw's RX depth) so that each request in flight has its own slot of the message
/// size (rounded up to 64 bytes) on both sides.
pub const SLOT_BYTES: usize = 4 << 20;

/// The distance between two slots for messages of up to `max_size` bytes.
pub fn stride(max_size: usize) -> usize {
    max_size.max(64).next_multiple_of(64)
}

/// How many slots of `max_size`-byte messages fit [`SLOT_BYTES`] (at least one).
pub fn max_slots(max_size: usize) -> u32 {
    u32::try_from((SLOT_BYTES / stride(max_size)).max(1)).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pattern_depends_on_the_qp_and_the_iteration_and_fill_matches_byte_at() {
        let mut a = vec![0u8; 1000];
        fill(&mut a, 0, 7);
        for (i, &b) in a.iter().enumerate() {
            assert_eq!(b, byte_at(0, 7, i), "offset {i}");
        }
        assert_eq!(verify(&a, 0, 7), Ok(()));
        // Prefixes of every length (the tail that is not a whole word) check too.
        for n in 0..=17 {
            let mut p = vec![0u8; n];
            fill(&mut p, 0, 7);
            assert_eq!(p[..], a[..n]);
            assert_eq!(verify(&a[..n], 0, 7), Ok(()));
        }
        let mut b = vec![0u8; 1000];
        fill(&mut b, 0, 8);
        let differ = a.iter().zip(&b).filter(|(x, y)| x != y).count();
        assert!(
            differ > 950,
            "iterations 7 and 8 differ at only {differ} bytes"
        );
        fill(&mut b, 1, 7);
        assert!(verify(&b, 0, 7).is_err(), "QP 1's message passed as QP 0's");
        // Another iteration's message fails at its first byte (as good as certain).
        let e = verify(&a, 0, 8).unwrap_err();
        assert_eq!(e.offset, 0);
        assert_eq!((e.expected, e.found), (byte_at(0, 8, 0), a[0]));
    }

    #[test]
    fn a_corrupted_byte_is_reported_with_its_offset_and_both_values() {
        for size in [1usize, 2, 7, 8, 9, 64, 4096, 65537] {
            let mut m = vec![0u8; size];
            fill(&mut m, 3, 12345);
            for offset in [0, size / 2, size - 1] {
                let mut bad = m.clone();
                bad[offset] ^= 0x5a;
                assert_eq!(
                    verify(&bad, 3, 12345),
                    Err(Mismatch {
                        offset,
                        expected: m[offset],
                        found: m[offset] ^ 0x5a,
                    }),
                    "size {size}, offset {offset}"
                );
            }
        }
        // Two bad bytes: the first is reported.
        let mut m = vec![0u8; 100];
        fill(&mut m, 0, 1);
        m[90] = !m[90];
        m[41] = !m[41];
        assert_eq!(verify(&m, 0, 1).unwrap_err().offset, 41);
    }

    #[test]
    fn no_pattern_byte_is_zero_so_a_cleared_buffer_fails_at_its_first_byte() {
        for k in 1..300 {
            let mut m = vec![0u8; 40];
            fill(&mut m, 0, k);
            assert!(m.iter().all(|&b| b != 0), "iteration {k}: {m:?}");
            assert_eq!(verify(&[0u8; 40], 0, k).unwrap_err().offset, 0);
        }
    }

    #[test]
    fn slots_fit_the_budget_and_the_line_has_its_format() {
        assert_eq!(stride(2), 64);
        assert_eq!(stride(65536), 65536);
        assert_eq!(stride(65537), 65600);
        assert_eq!(max_slots(65536), 64);
        assert_eq!(max_slots(8 << 20), 1);
        assert_eq!(max_slots(2), 65536);
        let mut v = Verified::default();
        v.add(4096);
        v.add(4096);
        let v = v.plus(Verified {
            messages: 1,
            bytes: 2,
        });
        assert_eq!(v.line(), "payloads verified: 3 messages, 8194 bytes");
    }
}
