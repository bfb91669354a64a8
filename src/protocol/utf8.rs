//! Incremental, fail-fast UTF-8 validation for text messages.
//!
//! A text message arrives in pieces (fragments, and reads inside a fragment). The validator
//! is fed each piece and fails as soon as the bytes seen so far cannot be the start of
//! valid UTF-8, which is what Autobahn's strict 6.4.x cases require. Bulk checking uses
//! `simdutf8`; only a code point split between two pieces (at most 4 bytes) goes through
//! the standard library.

/// Remembers the unfinished code point at the end of the last piece.
#[derive(Debug, Default, Clone)]
pub struct Utf8Validator {
    pending: [u8; 4],
    pending_len: u8,
}

/// The bytes fed so far cannot begin a valid UTF-8 string.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InvalidUtf8;

fn sequence_len(lead: u8) -> usize {
    match lead {
        0xf0..=0xf4 => 4,
        0xe0..=0xef => 3,
        _ => 2,
    }
}

impl Utf8Validator {
    /// A validator with nothing fed yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Checks the next piece of the message.
    pub fn feed(&mut self, mut bytes: &[u8]) -> Result<(), InvalidUtf8> {
        if self.pending_len > 0 {
            let have = self.pending_len as usize;
            let need = sequence_len(self.pending[0]) - have;
            let take = need.min(bytes.len());
            self.pending[have..have + take].copy_from_slice(&bytes[..take]);
            let len = have + take;
            match std::str::from_utf8(&self.pending[..len]) {
                Ok(_) => self.pending_len = 0,
                Err(e) if e.error_len().is_none() => {
                    // Still a valid prefix; `bytes` was shorter than the rest of the sequence.
                    self.pending_len = len as u8;
                    return Ok(());
                }
                Err(_) => return Err(InvalidUtf8),
            }
            bytes = &bytes[take..];
        }
        match simdutf8::compat::from_utf8(bytes) {
            Ok(_) => Ok(()),
            Err(e) => match e.error_len() {
                Some(_) => Err(InvalidUtf8),
                None => {
                    let rest = &bytes[e.valid_up_to()..];
                    self.pending[..rest.len()].copy_from_slice(rest);
                    self.pending_len = rest.len() as u8;
                    Ok(())
                }
            },
        }
    }

    /// Whether everything fed so far is complete, valid UTF-8 (call at the end of a message).
    pub fn is_complete(&self) -> bool {
        self.pending_len == 0
    }

    /// Forgets any unfinished code point, for the next message.
    pub fn reset(&mut self) {
        self.pending_len = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// What std says about a prefix: `Err` if no continuation could make it valid.
    fn std_prefix_ok(bytes: &[u8]) -> bool {
        match std::str::from_utf8(bytes) {
            Ok(_) => true,
            Err(e) => e.error_len().is_none(),
        }
    }

    fn utf8ish() -> impl Strategy<Value = Vec<u8>> {
        prop_oneof![
            any::<String>().prop_map(String::into_bytes),
            proptest::collection::vec(any::<u8>(), 0..40),
            (any::<String>(), any::<u8>(), any::<String>()).prop_map(|(a, b, c)| {
                let mut v = a.into_bytes();
                v.push(b);
                v.extend_from_slice(c.as_bytes());
                v
            }),
        ]
    }

    #[test]
    fn fails_at_first_impossible_byte() {
        let mut v = Utf8Validator::new();
        assert!(v.feed(&[0xce, 0xba, 0xe1]).is_ok()); // "κ" then the start of a 3-byte char
        assert!(v.feed(&[0xbd]).is_ok());
        assert!(!v.is_complete());
        // 0xed 0xa0 would start a UTF-16 surrogate: impossible already, before the 3rd byte.
        let mut v = Utf8Validator::new();
        assert_eq!(v.feed(&[0xed]), Ok(()));
        assert_eq!(v.feed(&[0xa0]), Err(InvalidUtf8));
        // 0xf4 0x90 would be above U+10FFFF.
        let mut v = Utf8Validator::new();
        assert_eq!(v.feed(&[0xf4]), Ok(()));
        assert_eq!(v.feed(&[0x90]), Err(InvalidUtf8));
    }

    proptest! {
        /// Any chunking: the validator fails exactly at the first chunk after which std says
        /// the prefix is impossible, and at the end agrees with `std::str::from_utf8`.
        #[test]
        fn incremental_equals_std(bytes in utf8ish(), cuts in proptest::collection::vec(0usize..64, 0..8)) {
            let mut v = Utf8Validator::new();
            let mut at = 0;
            let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c.min(bytes.len())).collect();
            cuts.sort();
            cuts.push(bytes.len());
            for cut in cuts {
                let result = v.feed(&bytes[at..cut]);
                at = cut;
                let expect_ok = std_prefix_ok(&bytes[..cut]);
                prop_assert_eq!(result.is_ok(), expect_ok);
                if !expect_ok {
                    return Ok(());
                }
            }
            prop_assert_eq!(v.is_complete(), std::str::from_utf8(&bytes).is_ok());
        }
    }
}
