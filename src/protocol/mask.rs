//! Masking (RFC 6455 §5.3): XOR of the payload with a 4-byte key.
//!
//! Three versions of one loop, each tested against the next:
//! - [`apply_mask_scalar`], the reference, a byte at a time;
//! - [`apply_mask_words`], portable: a `u64` at a time over the 8-byte-aligned middle of
//!   the buffer (`bytemuck` gives the aligned view without `unsafe`), which LLVM turns into
//!   SSE2 code on x86_64 by itself; the unaligned head and tail go through the scalar one.
//!   Under 32 bytes (most chat and echo messages) aligning costs more than it saves: those
//!   go eight bytes at a time through unaligned words, then the last few one by one;
//! - on x86_64 CPUs with AVX-512F or AVX2 (detected at run time, once), the same word loop
//!   compiled for 512- or 256-bit registers, started on a cache line from 1 KiB up. This
//!   is the crate's only `unsafe` outside the reactor: calling a `#[target_feature]`
//!   function, after the check. `benches/protocol.rs` (`unmask`) gives the figures: at
//!   16 KiB, on an Intel Xeon VM, the word loop moves about 32 bytes per nanosecond, the
//!   AVX2 build 48–62 and the AVX-512 build 80–115, which matters because a server
//!   unmasks every byte it receives.
//!
//! [`apply_mask`] picks the widest one that applies.

/// The scalar reference: byte `i` of `buf` is payload byte `offset + i`.
pub fn apply_mask_scalar(buf: &mut [u8], mask: [u8; 4], offset: usize) {
    for (i, byte) in buf.iter_mut().enumerate() {
        *byte ^= mask[(offset + i) & 3];
    }
}

/// XORs `buf` with `mask` in place; byte `i` of `buf` is payload byte `offset + i`, so a
/// payload can be unmasked in pieces as it arrives.
pub fn apply_mask(buf: &mut [u8], mask: [u8; 4], offset: usize) {
    // A zero key changes nothing (a peer may send one; the tokio stream zeroes the key of
    // a frame it unmasked while reading it).
    if mask == [0; 4] {
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if buf.len() >= WIDE_MIN
        && (Wide::Avx512.apply(buf, mask, offset) || Wide::Avx2.apply(buf, mask, offset))
    {
        return;
    }
    apply_mask_words(buf, mask, offset);
}

/// Below this length the wide builds gain nothing over the word loop.
#[cfg(target_arch = "x86_64")]
const WIDE_MIN: usize = 128;

/// The word loop compiled for wider registers, each used only where the CPU has it.
#[cfg(target_arch = "x86_64")]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Wide {
    /// 512-bit registers (AVX-512F).
    Avx512,
    /// 256-bit registers (AVX2).
    Avx2,
}

#[cfg(target_arch = "x86_64")]
impl Wide {
    /// Whether this CPU has the build's instructions (detected once, then cached by std).
    fn available(self) -> bool {
        match self {
            Wide::Avx512 => std::arch::is_x86_feature_detected!("avx512f"),
            Wide::Avx2 => std::arch::is_x86_feature_detected!("avx2"),
        }
    }

    /// Masks `buf` with this build and returns `true`, or returns `false` without touching
    /// `buf` where the CPU lacks it.
    #[allow(unsafe_code)]
    fn apply(self, buf: &mut [u8], mask: [u8; 4], offset: usize) -> bool {
        if !self.available() {
            return false;
        }
        match self {
            // SAFETY: `apply_mask_avx512` needs nothing but AVX-512F, which the CPU was
            // just checked for; the function itself is safe code (bounds-checked slices).
            Wide::Avx512 => unsafe { apply_mask_avx512(buf, mask, offset) },
            // SAFETY: as above, for AVX2.
            Wide::Avx2 => unsafe { apply_mask_avx2(buf, mask, offset) },
        }
        true
    }
}

/// [`apply_mask_from_line`] compiled for AVX-512. Callers must check that the CPU has it.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn apply_mask_avx512(buf: &mut [u8], mask: [u8; 4], offset: usize) {
    apply_mask_from_line(buf, mask, offset);
}

/// [`apply_mask_from_line`] compiled for AVX2. Callers must check that the CPU has it.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn apply_mask_avx2(buf: &mut [u8], mask: [u8; 4], offset: usize) {
    apply_mask_from_line(buf, mask, offset);
}

/// From this length on, the wide builds start their word loop on a cache line; below it
/// the longer head costs more than the aligned loads save.
#[cfg(target_arch = "x86_64")]
const LINE_MIN: usize = 1024;

/// The word loop, started on a 64-byte boundary for long buffers: a wide load that
/// straddles two cache lines costs about two, and the word loop alone aligns only to 8
/// bytes (16 KiB: about 1.5× the throughput, `benches/protocol.rs`).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn apply_mask_from_line(buf: &mut [u8], mask: [u8; 4], offset: usize) {
    if buf.len() < LINE_MIN {
        apply_mask_words(buf, mask, offset);
        return;
    }
    let lead = buf.as_ptr().align_offset(64).min(buf.len());
    let (head, rest) = buf.split_at_mut(lead);
    apply_mask_words(head, mask, offset);
    apply_mask_words(rest, mask, offset + lead);
}

/// The portable word loop: what [`apply_mask`] runs where neither wide build is available,
/// and below 128 bytes.
#[inline(always)]
pub fn apply_mask_words(buf: &mut [u8], mask: [u8; 4], offset: usize) {
    if buf.len() < 32 {
        apply_mask_short(buf, mask, offset);
        return;
    }
    let (head, middle, tail) = bytemuck::pod_align_to_mut::<u8, u64>(buf);
    apply_mask_scalar(head, mask, offset);
    // The key as seen from the first aligned byte, repeated over a whole word.
    let (k, word) = key_word(mask, offset + head.len());
    for w in middle.iter_mut() {
        *w ^= word;
    }
    // Words are a multiple of 4 bytes, so the tail starts where the key starts over.
    apply_mask_scalar(tail, k, 0);
}

/// The key as seen from payload byte `offset`, and the same repeated over a 64-bit word.
fn key_word(mask: [u8; 4], offset: usize) -> ([u8; 4], u64) {
    let k = [
        mask[offset & 3],
        mask[(offset + 1) & 3],
        mask[(offset + 2) & 3],
        mask[(offset + 3) & 3],
    ];
    let word = u64::from_ne_bytes([k[0], k[1], k[2], k[3], k[0], k[1], k[2], k[3]]);
    (k, word)
}

/// Short payloads (most chat and echo messages): eight bytes at a time through unaligned
/// words, which costs less than aligning first; then the last few bytes one by one.
fn apply_mask_short(buf: &mut [u8], mask: [u8; 4], offset: usize) {
    let (k, word) = key_word(mask, offset);
    let mut words = buf.chunks_exact_mut(8);
    for chunk in &mut words {
        let bytes: &mut [u8; 8] = chunk.try_into().expect("chunks of eight");
        *bytes = (u64::from_ne_bytes(*bytes) ^ word).to_ne_bytes();
    }
    // Eight is a multiple of four, so the rest starts where the key starts over.
    apply_mask_scalar(words.into_remainder(), k, 0);
}

/// A fresh, unpredictable masking key for each client frame (RFC 6455 §5.3 and §10.3).
///
/// Keys come from the operating system's CSPRNG (`getrandom`), fetched 4 KiB at a time
/// per thread so a frame costs no system call.
pub fn random_mask() -> [u8; 4] {
    use std::cell::RefCell;
    const POOL: usize = 4096;
    struct Pool {
        bytes: [u8; POOL],
        next: usize,
    }
    thread_local! {
        static KEYS: RefCell<Pool> = const { RefCell::new(Pool { bytes: [0; POOL], next: POOL }) };
    }
    KEYS.with(|pool| {
        let mut pool = pool.borrow_mut();
        if pool.next == POOL {
            getrandom::fill(&mut pool.bytes).expect("the operating system's random source failed");
            pool.next = 0;
        }
        let n = pool.next;
        pool.next += 4;
        [
            pool.bytes[n],
            pool.bytes[n + 1],
            pool.bytes[n + 2],
            pool.bytes[n + 3],
        ]
    })
}

/// Fills `buf` from the operating system's CSPRNG.
pub(crate) fn random_bytes(buf: &mut [u8]) {
    getrandom::fill(buf).expect("the operating system's random source failed");
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn rfc_example_hello() {
        // RFC 6455 §5.7: "Hello" masked with 37 fa 21 3d.
        let mut data = *b"Hello";
        apply_mask(&mut data, [0x37, 0xfa, 0x21, 0x3d], 0);
        assert_eq!(data, [0x7f, 0x9f, 0x4d, 0x51, 0x58]);
    }

    #[test]
    fn masks_differ_between_frames() {
        let keys: Vec<[u8; 4]> = (0..2048).map(|_| random_mask()).collect();
        let mut sorted = keys.clone();
        sorted.sort();
        sorted.dedup();
        // 2048 draws from 2^32: a collision is possible but vanishingly rare (p ≈ 5e-4).
        assert!(sorted.len() >= 2046, "too many repeated masking keys");
        assert!(keys.windows(2).all(|w| w[0] != w[1]));
    }

    proptest! {
        #[test]
        fn word_loop_equals_scalar(data in proptest::collection::vec(any::<u8>(), 0..600),
                                   mask in any::<[u8; 4]>(), offset in 0usize..16, skip in 0usize..8) {
            let skip = skip.min(data.len());
            let mut fast = data.clone();
            let mut slow = data.clone();
            // `skip` moves the start so every alignment of the head is exercised.
            apply_mask_words(&mut fast[skip..], mask, offset);
            apply_mask_scalar(&mut slow[skip..], mask, offset);
            prop_assert_eq!(fast, slow);
        }

        /// `apply_mask` (the AVX2 build where the CPU has it, lengths from 128 up) against
        /// the scalar reference, at lengths on both sides of every threshold.
        #[test]
        fn short_words_equal_scalar(data in proptest::collection::vec(any::<u8>(), 0..32),
                                    mask in any::<[u8; 4]>(), offset in 0usize..8) {
            let mut expected = data.clone();
            apply_mask_scalar(&mut expected, mask, offset);
            let mut got = data;
            apply_mask_short(&mut got, mask, offset);
            prop_assert_eq!(got, expected);
        }

        #[test]
        fn dispatched_kernel_equals_scalar(data in proptest::collection::vec(any::<u8>(), 0..1200),
                                           mask in any::<[u8; 4]>(), offset in 0usize..16, skip in 0usize..64) {
            let skip = skip.min(data.len());
            let mut fast = data.clone();
            let mut slow = data.clone();
            apply_mask(&mut fast[skip..], mask, offset);
            apply_mask_scalar(&mut slow[skip..], mask, offset);
            prop_assert_eq!(fast, slow);
        }

        /// Each wide build on its own (dispatch reaches only the widest one the CPU has),
        /// at lengths on both sides of `LINE_MIN` and every start within a cache line; a
        /// build the CPU lacks must leave the buffer alone.
        #[cfg(target_arch = "x86_64")]
        #[test]
        fn each_wide_build_equals_scalar(data in proptest::collection::vec(any::<u8>(), 0..4300),
                                         mask in any::<[u8; 4]>(), offset in 0usize..16, skip in 0usize..64) {
            let skip = skip.min(data.len());
            let mut slow = data.clone();
            apply_mask_scalar(&mut slow[skip..], mask, offset);
            for wide in [Wide::Avx512, Wide::Avx2] {
                let mut fast = data.clone();
                if wide.apply(&mut fast[skip..], mask, offset) {
                    prop_assert_eq!(&fast, &slow, "{:?}", wide);
                } else {
                    prop_assert!(!wide.available());
                    prop_assert_eq!(&fast, &data, "{:?} touched the buffer", wide);
                }
            }
        }

        #[test]
        fn unmasking_in_pieces_equals_whole(data in proptest::collection::vec(any::<u8>(), 0..400),
                                            mask in any::<[u8; 4]>(), cut in 0usize..400) {
            let cut = cut.min(data.len());
            let mut whole = data.clone();
            apply_mask(&mut whole, mask, 0);
            let mut pieces = data.clone();
            let (a, b) = pieces.split_at_mut(cut);
            apply_mask(a, mask, 0);
            apply_mask(b, mask, cut);
            prop_assert_eq!(whole, pieces);
        }
    }
}
