//! `parse_header` on arbitrary bytes, and `encode_header` on whatever it accepts.
//!
//! Checked: a parse never panics; `Partial` only happens on fewer than 14 bytes; a complete
//! header takes at most 14 bytes; every proper prefix of a complete header is `Partial`
//! (the parser consumes nothing and judges errors from the bytes seen so far);
//! `parse(encode(h)) == h`; and the encoding equals the input bytes exactly when the input
//! used the shortest length form (non-minimal lengths parse, but encode shorter).

#![no_main]

use libfuzzer_sys::fuzz_target;
use websocket_driver::protocol::frame::{MAX_HEADER_LEN, Status, encode_header, parse_header};

fuzz_target!(|data: &[u8]| {
    let parsed = parse_header(data, 0);
    match parsed {
        Ok(Status::Partial) => {
            assert!(
                data.len() < MAX_HEADER_LEN,
                "Partial with {} bytes of input",
                data.len()
            );
        }
        Err(ref e) => {
            // An error is judged from a prefix, so any longer input fails the same way.
            let mut longer = data.to_vec();
            longer.extend_from_slice(&[0xff; MAX_HEADER_LEN]);
            assert_eq!(
                parse_header(&longer, 0).as_ref().err(),
                Some(e),
                "error not stable under more input"
            );
        }
        Ok(Status::Complete(h, n)) => {
            assert!(
                (2..=MAX_HEADER_LEN).contains(&n) && n <= data.len(),
                "bad header length {n}"
            );
            assert!(h.payload_len >> 63 == 0, "top bit of the length set");
            if h.opcode.is_control() {
                assert!(
                    h.fin && h.payload_len <= 125,
                    "bad control header accepted: {h:?}"
                );
            }
            assert_eq!(h.rsv, 0, "reserved bits accepted with allowed_rsv = 0");
            // Parsing only the header bytes gives the same result.
            assert_eq!(parse_header(&data[..n], 0), Ok(Status::Complete(h, n)));
            for cut in 0..n {
                assert_eq!(
                    parse_header(&data[..cut], 0),
                    Ok(Status::Partial),
                    "prefix of {cut} bytes"
                );
            }
            // Allowing every RSV bit changes nothing when none is set.
            assert_eq!(parse_header(data, 0b111), Ok(Status::Complete(h, n)));

            let mut buf = [0u8; MAX_HEADER_LEN];
            let m = encode_header(&mut buf, &h);
            assert_eq!(m, h.encoded_len());
            assert!(
                m <= n,
                "encoding ({m} bytes) longer than the input header ({n} bytes)"
            );
            assert_eq!(
                parse_header(&buf[..m], 0),
                Ok(Status::Complete(h, m)),
                "round trip"
            );
            if m == n {
                assert_eq!(
                    &buf[..m],
                    &data[..n],
                    "shortest-form header does not re-encode to itself"
                );
            }
        }
    }
    // With RSV bits allowed, the only difference is that ReservedBits never comes back.
    if let Err(e) = parse_header(data, 0b111) {
        assert!(
            !matches!(e, websocket_driver::ProtocolError::ReservedBits(_)),
            "{e:?}"
        );
    }
});
