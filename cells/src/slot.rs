//! The slot hash: a public contract shared with apps in every language. Pure.
//!
//! `slot = XXH3-64(seed 0, UTF-8 bytes of the user key) mod slots`. Never change it:
//! every user's home would move. Test vectors: `cells/testdata/slot-vectors.tsv`.

use xxhash_rust::xxh3::xxh3_64;

/// Default number of slots; fixed for the life of a platform.
pub const DEFAULT_SLOTS: u32 = 16384;
/// Upper bound on the slot count (keeps the routing table a small flat array).
pub const MAX_SLOTS: u32 = 1 << 20;

/// A slot index in `0..slots`.
pub type Slot = u32;

/// Maps a user key to its slot. `slots` must be >= 1 (checked where the count is configured).
#[inline]
pub fn slot_for_key(key: &str, slots: u32) -> Slot {
    slot_for_bytes(key.as_bytes(), slots)
}

/// [`slot_for_key`] of a key held as bytes (a database column stores the key's UTF-8
/// bytes; the hash is over bytes either way).
#[inline]
pub fn slot_for_bytes(key: &[u8], slots: u32) -> Slot {
    debug_assert!(slots >= 1);
    (xxh3_64(key) % u64::from(slots)) as Slot
}

/// Validates a configured slot count.
pub fn check_slot_count(slots: u32) -> crate::Result<()> {
    if (1..=MAX_SLOTS).contains(&slots) {
        Ok(())
    } else {
        Err(crate::Error::SlotCount {
            got: slots,
            max: MAX_SLOTS,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The vectors were produced by Python's `xxhash` package (an independent XXH3
    /// implementation); this checks the Rust side agrees on every one.
    #[test]
    fn matches_checked_in_vectors() {
        let text = include_str!("../testdata/slot-vectors.tsv");
        let mut checked = 0;
        for (lineno, line) in text.lines().enumerate() {
            if line.starts_with('#') {
                continue;
            }
            let (key, slot) = line.split_once('\t').expect("key<TAB>slot");
            let want: u32 = slot.parse().expect("slot is a number");
            assert_eq!(
                slot_for_key(key, DEFAULT_SLOTS),
                want,
                "line {} key {key:?}",
                lineno + 1
            );
            checked += 1;
        }
        assert!(checked >= 1000, "only {checked} vectors");
    }

    #[test]
    fn documented_example() {
        // Quoted in the README.
        assert_eq!(slot_for_key("alice", DEFAULT_SLOTS), 5808);
    }

    #[test]
    fn slot_count_bounds() {
        assert!(check_slot_count(0).is_err());
        assert!(check_slot_count(16384).is_ok());
        assert!(check_slot_count(MAX_SLOTS + 1).is_err());
        assert_eq!(slot_for_key("anything", 1), 0);
    }
}
