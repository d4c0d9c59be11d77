//! Bearer-token checks for admin endpoints (the router's gRPC API, cell apps' admin routes),
//! pure.

/// Whether an `Authorization` header value carries `Bearer <token>`. The comparison takes
/// the same time wherever the first difference is, so the token cannot be guessed byte by
/// byte from response times.
pub fn bearer_matches(authorization: Option<&str>, token: &str) -> bool {
    let presented = authorization
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    presented.len() == token.len()
        && presented
            .bytes()
            .zip(token.bytes())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
}

#[cfg(test)]
mod tests {
    use super::bearer_matches;

    #[test]
    fn only_the_exact_bearer_token_matches() {
        assert!(bearer_matches(Some("Bearer s3cret"), "s3cret"));
        for wrong in [
            None,
            Some("s3cret"),
            Some("Bearer s3cre"),
            Some("Bearer s3cret!"),
            Some("bearer s3cret"),
        ] {
            assert!(!bearer_matches(wrong, "s3cret"), "{wrong:?}");
        }
    }
}
