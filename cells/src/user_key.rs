//! The user-key contract, shared by the router (which routes on the key) and the in-cell
//! SDK (whose fence checks it), so both always hash the same bytes. Pure.
//!
//! - A key is text: its UTF-8 bytes are what [`crate::slot::slot_for_key`] hashes.
//! - From a header or a cookie, the key is the value's bytes as sent, which must be UTF-8
//!   (HTTP allows bytes above 0x7F in header values; they are not re-encoded).
//! - From a path segment or a query parameter, the key is percent-decoded first (RFC 3986:
//!   `%C3%A9` is `é`, `%2F` is `/`; `+` stays `+`), because a URI cannot carry those
//!   bytes otherwise.
//! - At most [`MAX_KEY_LEN`] bytes after decoding; an empty value is no key.
//!
//! A value that breaks a rule is refused (the router answers 400 naming the rule), never
//! treated as absent: a client that sent a key learns why it was not used.

use std::borrow::Cow;

/// Longest user key, in bytes of UTF-8 after any percent-decoding.
pub const MAX_KEY_LEN: usize = 256;

/// Why a value sent as a user key cannot be one.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("the user key is {0} bytes long; the limit is {MAX_KEY_LEN} bytes (UTF-8, after percent-decoding)")]
    TooLong(usize),
    #[error("the user key is not valid UTF-8: keys are text, hashed as UTF-8 bytes")]
    NotUtf8,
    #[error("the user key has a malformed percent-encoding: '%' must be followed by two hex digits (write '%25' for '%')")]
    BadPercentEncoding,
}

/// A key sent as it is (a header value, a cookie, a JWT claim). `None`: empty.
pub fn from_raw(value: &[u8]) -> Result<Option<&str>, KeyError> {
    if value.is_empty() {
        return Ok(None);
    }
    if value.len() > MAX_KEY_LEN {
        return Err(KeyError::TooLong(value.len()));
    }
    std::str::from_utf8(value)
        .map(Some)
        .map_err(|_| KeyError::NotUtf8)
}

/// A key sent in a URI component (a path segment, a query value), percent-decoded.
/// `None`: empty.
pub fn from_uri_component(component: &str) -> Result<Option<Cow<'_, str>>, KeyError> {
    if !component.contains('%') {
        return Ok(from_raw(component.as_bytes())?.map(Cow::Borrowed));
    }
    let decoded = percent_decode(component.as_bytes())?;
    Ok(from_raw(&decoded)?.map(|k| Cow::Owned(k.to_owned())))
}

fn percent_decode(input: &[u8]) -> Result<Vec<u8>, KeyError> {
    let hex = |b: u8| (b as char).to_digit(16).map(|d| d as u8);
    let mut out = Vec::with_capacity(input.len());
    let mut i = 0;
    while i < input.len() {
        if input[i] == b'%' {
            let (hi, lo) = input
                .get(i + 1)
                .zip(input.get(i + 2))
                .and_then(|(h, l)| hex(*h).zip(hex(*l)))
                .ok_or(KeyError::BadPercentEncoding)?;
            out.push(hi << 4 | lo);
            i += 3;
        } else {
            out.push(input[i]);
            i += 1;
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raw_keys_are_utf8_text_within_the_limit() {
        assert_eq!(from_raw(b""), Ok(None));
        assert_eq!(from_raw("Ünïcødé".as_bytes()), Ok(Some("Ünïcødé")));
        let longest = "a".repeat(MAX_KEY_LEN);
        assert_eq!(from_raw(longest.as_bytes()), Ok(Some(longest.as_str())));
        assert_eq!(
            from_raw("a".repeat(MAX_KEY_LEN + 1).as_bytes()),
            Err(KeyError::TooLong(257))
        );
        assert_eq!(from_raw(&[0xff, 0xfe]), Err(KeyError::NotUtf8));
        // 86 three-byte characters are 258 bytes: the limit counts bytes, not characters.
        assert_eq!(
            from_raw("用".repeat(86).as_bytes()),
            Err(KeyError::TooLong(258))
        );
    }

    #[test]
    fn uri_components_are_percent_decoded_before_the_rules() {
        assert_eq!(
            from_uri_component("alice").unwrap().as_deref(),
            Some("alice")
        );
        assert_eq!(from_uri_component("%C3%A9").unwrap().as_deref(), Some("é"));
        assert_eq!(from_uri_component("%c3%a9").unwrap().as_deref(), Some("é"));
        assert_eq!(
            from_uri_component("caf%C3%A9%20au+lait")
                .unwrap()
                .as_deref(),
            Some("café au+lait"),
            "'+' is not a space outside form bodies"
        );
        assert_eq!(from_uri_component("a%2Fb").unwrap().as_deref(), Some("a/b"));
        assert_eq!(from_uri_component("").unwrap(), None);
        for bad in ["%", "%4", "%ZZ", "100%", "%%41"] {
            assert_eq!(
                from_uri_component(bad),
                Err(KeyError::BadPercentEncoding),
                "{bad}"
            );
        }
        assert_eq!(from_uri_component("%FF"), Err(KeyError::NotUtf8));
        // The limit applies to the decoded key: 257 bytes sent as 771 characters.
        assert_eq!(
            from_uri_component(&"%61".repeat(257)),
            Err(KeyError::TooLong(257))
        );
        let longest = "%61".repeat(MAX_KEY_LEN);
        assert_eq!(
            from_uri_component(&longest).unwrap().map(|k| k.len()),
            Some(MAX_KEY_LEN)
        );
    }

    proptest::proptest! {
        /// Percent-encoding any key and decoding it gives the key back.
        #[test]
        fn encoding_round_trips(key in "\\PC{1,64}") {
            let encoded: String = key.bytes().map(|b| format!("%{b:02X}")).collect();
            let decoded = from_uri_component(&encoded);
            if key.len() <= MAX_KEY_LEN {
                let decoded = decoded.unwrap();
                proptest::prop_assert_eq!(decoded.as_deref(), Some(key.as_str()));
            } else {
                proptest::prop_assert_eq!(decoded, Err(KeyError::TooLong(key.len())));
            }
        }
    }
}
