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

/// One transaction's id: `domain-server-seqno`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Gtid {
    pub domain: u32,
    pub server: u32,
    pub seq: u64,
}

impl std::fmt::Display for Gtid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}-{}-{}", self.domain, self.server, self.seq)
    }
}

impl Gtid {
    pub fn parse(s: &str) -> Option<Gtid> {
        let mut it = s.trim().split('-');
        let g = Gtid {
            domain: it.next()?.parse().ok()?,
            server: it.next()?.parse().ok()?,
            seq: it.next()?.parse().ok()?,
        };
        it.next().is_none().then_some(g)
    }

    /// The transaction is not in `pos` (its domain's sequence number there is lower): on
    /// an old home that returned, such a transaction is errant when `pos` is the new
    /// home's position.
    pub fn beyond(&self, pos: &str) -> bool {
        let known = parse(pos)
            .into_iter()
            .find(|(d, _)| *d == self.domain)
            .map_or(0, |(_, s)| s);
        self.seq > known
    }
}

/// The GTID a binary log's `Gtid` event names (`SHOW BINLOG EVENTS` prints `BEGIN GTID
/// 1-1-5`, or `GTID 1-1-6` for DDL, possibly followed by more words).
pub fn of_gtid_event(info: &str) -> Option<Gtid> {
    let mut words = info.split_whitespace();
    words.find(|w| *w == "GTID")?;
    Gtid::parse(words.next()?)
}

/// `primary`'s entries, plus the entries of `rest` for domains `primary` lacks: the
/// replica position of a server rebuilt from a snapshot at `primary` that keeps
/// replicating other domains from elsewhere.
pub fn merge(primary: &str, rest: &str) -> String {
    let domain = |g: &str| g.trim().split('-').next().map(str::to_string);
    let mut out: Vec<String> = primary
        .split(',')
        .map(str::trim)
        .filter(|g| Gtid::parse(g).is_some())
        .map(str::to_string)
        .collect();
    let taken: Vec<Option<String>> = out.iter().map(|g| domain(g)).collect();
    for g in rest.split(',').map(str::trim) {
        if Gtid::parse(g).is_some() && !taken.contains(&domain(g)) {
            out.push(g.to_string());
        }
    }
    out.join(",")
}

/// A position as a reader of the binary log advances it: the last transaction seen per
/// domain. Parsing is strict (a position is an input that a move starts from).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Position(std::collections::BTreeMap<u32, Gtid>);

impl Position {
    /// `domain-server-seqno,...`; empty is the position before every transaction.
    pub fn parse(text: &str) -> Option<Position> {
        let mut pos = Position::default();
        for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let g = Gtid::parse(part)?;
            if pos.0.insert(g.domain, g).is_some() {
                return None;
            }
        }
        Some(pos)
    }

    /// After `gtid`'s transaction.
    pub fn advance(&mut self, gtid: Gtid) {
        self.0.insert(gtid.domain, gtid);
    }
}

impl std::fmt::Display for Position {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let parts: Vec<String> = self.0.values().map(Gtid::to_string).collect();
        f.write_str(&parts.join(","))
    }
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

    #[test]
    fn errant_transactions_are_those_beyond_the_new_home_position() {
        let g = Gtid::parse("3-3-120").unwrap();
        assert_eq!(g.to_string(), "3-3-120");
        assert!(g.beyond("3-3-119,4-4-500"));
        assert!(!g.beyond("3-3-120"));
        assert!(g.beyond("4-4-500"), "a domain the position lacks is at 0");
        assert_eq!(Gtid::parse("3-3"), None);
        assert_eq!(Gtid::parse("3-3-1-1"), None);
        assert_eq!(of_gtid_event("BEGIN GTID 3-3-121"), Gtid::parse("3-3-121"));
        assert_eq!(of_gtid_event("GTID 0-1-2 cid=5"), Gtid::parse("0-1-2"));
        assert_eq!(of_gtid_event("COMMIT /* xid=5 */"), None);
    }

    #[test]
    fn merge_keeps_the_primary_and_adds_other_domains() {
        assert_eq!(merge("1-1-10,2-2-5", "2-2-9,3-3-4"), "1-1-10,2-2-5,3-3-4");
        assert_eq!(merge("", "3-3-4"), "3-3-4");
        assert_eq!(merge("1-1-10", ""), "1-1-10");
    }

    #[test]
    fn positions_advance_per_domain_and_print_as_the_server_does() {
        let mut p = Position::parse("2-2-5, 1-1-10").unwrap();
        assert_eq!(p.to_string(), "1-1-10,2-2-5");
        p.advance(Gtid::parse("2-7-6").unwrap());
        p.advance(Gtid::parse("3-3-1").unwrap());
        assert_eq!(p.to_string(), "1-1-10,2-7-6,3-3-1");
        assert_eq!(Position::parse("").unwrap().to_string(), "");
        assert_eq!(Position::parse("1-1-x"), None);
        assert_eq!(Position::parse("1-1-1,1-2-2"), None, "one entry per domain");
        assert!(reached(&p.to_string(), "1-1-10,2-2-6"));
    }
}
