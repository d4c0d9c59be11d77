//! MariaDB GTID positions as the server prints them (`domain-server-seqno`, joined by
//! commas). Pure: how far a replica is behind, and whether it has reached a position, are
//! decisions the failover logic takes on plain strings.

/// `(domain, seqno)` pairs of a position; malformed entries are skipped.
fn parse(pos: &str) -> Vec<(u32, u64)> {
    pos.split(',')
        .filter_map(|g| {
            let mut it = g.trim().split('-');
            let domain = it.next()?.parse().ok()?;
            let _server = it.next()?;
            let seq = it.next()?.parse().ok()?;
            Some((domain, seq))
        })
        .collect()
}

/// Transactions the replica still has to apply: for each GTID domain of the primary's
/// position, its sequence number minus the replica's.
pub fn lag(primary: &str, replica: &str) -> u64 {
    let theirs = parse(replica);
    parse(primary)
        .into_iter()
        .map(|(domain, seq)| {
            let applied = theirs
                .iter()
                .find(|(d, _)| *d == domain)
                .map_or(0, |(_, s)| *s);
            seq.saturating_sub(applied)
        })
        .sum()
}

/// The replica has applied everything up to `target` (in every domain of it).
pub fn reached(replica: &str, target: &str) -> bool {
    lag(target, replica) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lag_counts_per_domain_and_reached_needs_every_domain() {
        assert_eq!(lag("1-1-10,2-2-5", "1-1-7,2-2-5"), 3);
        assert_eq!(lag("1-1-10", ""), 10);
        assert_eq!(lag("1-1-10", "1-1-12"), 0, "ahead is not negative");
        assert!(reached("1-1-10,2-2-5", "1-1-10"));
        assert!(!reached("2-2-5", "1-1-10,2-2-5"));
        assert!(
            reached("anything", ""),
            "an empty position is reached by anyone"
        );
        assert_eq!(
            lag("garbage,1-1-3", "1-1-1"),
            2,
            "malformed entries are skipped"
        );
    }
}
