//! Masking (RFC 6455 §5.3): XOR of the payload with a 4-byte key.
//!
//! The hot loop works a `u64` at a time over the 8-byte-aligned middle of the buffer
//! (`bytemuck` gives the aligned view without `unsafe`); LLVM turns that loop into SSE2
//! code on x86_64 by itself. The unaligned head and tail go through the scalar reference.
//! Explicit AVX2 intrinsics would need `unsafe` plus runtime detection, and the benchmark
//! (`benches/protocol.rs`) shows the word loop already runs at memory speed for 4 KiB and
//! larger payloads, so there is none.

/// The scalar reference: byte `i` of `buf` is payload byte `offset + i`.
pub fn apply_mask_scalar(buf: &mut [u8], mask: [u8; 4], offset: usize) {
    for (i, byte) in buf.iter_mut().enumerate() {
        *byte ^= mask[(offset + i) & 3];
    }
}

/// XORs `buf` with `mask` in place; byte `i` of `buf` is payload byte `offset + i`, so a
/// payload can be unmasked in pieces as it arrives.
pub fn apply_mask(buf: &mut [u8], mask: [u8; 4], offset: usize) {
    if buf.len() < 32 {
        apply_mask_scalar(buf, mask, offset);
        return;
    }
    let (head, middle, tail) = bytemuck::pod_align_to_mut::<u8, u64>(buf);
    apply_mask_scalar(head, mask, offset);
    // The key as seen from the first aligned byte, repeated over a whole word.
    let start = offset + head.len();
    let k = [
        mask[start & 3],
        mask[(start + 1) & 3],
        mask[(start + 2) & 3],
        mask[(start + 3) & 3],
    ];
    let word = u64::from_ne_bytes([k[0], k[1], k[2], k[3], k[0], k[1], k[2], k[3]]);
    for w in middle.iter_mut() {
        *w ^= word;
    }
    // Words are a multiple of 4 bytes, so the tail starts where the key starts over.
    apply_mask_scalar(tail, k, 0);
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
            apply_mask(&mut fast[skip..], mask, offset);
            apply_mask_scalar(&mut slow[skip..], mask, offset);
            prop_assert_eq!(fast, slow);
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
