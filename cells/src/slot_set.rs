//! A set of slots: what a slot move carries. Pure. Written for people as ranges
//! (`0-99,205,4000-4095`), the form the CLI takes and an operation record stores.

use crate::slot::{check_slot_count, Slot};
use crate::{Error, Result};
use std::fmt;

/// Slots out of `0..slots`, as a bitmap (membership is tested per row a mover reads).
#[derive(Clone, PartialEq, Eq)]
pub struct SlotSet {
    slots: u32,
    members: Vec<bool>,
    len: usize,
}

fn invalid(problem: impl Into<String>) -> Error {
    Error::SlotSet(problem.into())
}

impl SlotSet {
    /// The empty set over `0..slots`.
    pub fn empty(slots: u32) -> Result<Self> {
        check_slot_count(slots)?;
        Ok(Self {
            slots,
            members: vec![false; slots as usize],
            len: 0,
        })
    }

    /// The given slots (duplicates are one member); an out-of-range slot is refused.
    pub fn of(slots: u32, members: impl IntoIterator<Item = Slot>) -> Result<Self> {
        let mut set = Self::empty(slots)?;
        for s in members {
            set.insert(s)?;
        }
        Ok(set)
    }

    /// Parses `0-99,205` (inclusive ranges and single slots, in any order).
    pub fn parse(slots: u32, text: &str) -> Result<Self> {
        let mut set = Self::empty(slots)?;
        for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let number = |s: &str| {
                s.trim().parse::<Slot>().map_err(|_| {
                    invalid(format!(
                        "{part:?} is not a slot or a range; write slots like 0-99,205"
                    ))
                })
            };
            let (first, last) = match part.split_once('-') {
                Some((a, b)) => (number(a)?, number(b)?),
                None => (number(part)?, number(part)?),
            };
            if first > last {
                return Err(invalid(format!(
                    "range {part:?} runs backwards; write it as {last}-{first}"
                )));
            }
            for s in first..=last {
                set.insert(s)?;
            }
        }
        Ok(set)
    }

    pub fn insert(&mut self, slot: Slot) -> Result<()> {
        let flag = self.members.get_mut(slot as usize).ok_or_else(|| {
            invalid(format!(
                "slot {slot} is out of range (0..{}); the platform has {} slots",
                self.slots, self.slots
            ))
        })?;
        if !*flag {
            *flag = true;
            self.len += 1;
        }
        Ok(())
    }

    #[inline]
    pub fn contains(&self, slot: Slot) -> bool {
        self.members.get(slot as usize).copied().unwrap_or(false)
    }

    /// The platform's slot count this set is drawn from.
    pub fn slot_count(&self) -> u32 {
        self.slots
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Members in ascending order.
    pub fn iter(&self) -> impl Iterator<Item = Slot> + '_ {
        self.members
            .iter()
            .enumerate()
            .filter(|(_, &m)| m)
            .map(|(s, _)| s as Slot)
    }

    /// Members as inclusive ranges, ascending and disjoint (how a routing table stores
    /// frozen slots).
    pub fn ranges(&self) -> Vec<(Slot, Slot)> {
        let mut out: Vec<(Slot, Slot)> = Vec::new();
        for s in self.iter() {
            match out.last_mut() {
                Some((_, last)) if *last + 1 == s => *last = s,
                _ => out.push((s, s)),
            }
        }
        out
    }
}

/// Ranges, ascending: `0-99,205`. Parsing it gives the set back.
impl fmt::Display for SlotSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts: Vec<String> = self
            .ranges()
            .into_iter()
            .map(|(first, last)| {
                if first == last {
                    first.to_string()
                } else {
                    format!("{first}-{last}")
                }
            })
            .collect();
        f.write_str(&parts.join(","))
    }
}

impl fmt::Debug for SlotSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SlotSet({} of {}: {self})", self.len, self.slots)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parses_ranges_and_prints_them_back() {
        let set = SlotSet::parse(1024, "5, 0-3,7,4, 9-9").unwrap();
        assert_eq!(set.len(), 8);
        assert_eq!(set.to_string(), "0-5,7,9");
        assert!(set.contains(4) && !set.contains(6) && !set.contains(5000));
        assert_eq!(SlotSet::parse(1024, "").unwrap().len(), 0);
        assert_eq!(set.slot_count(), 1024);
    }

    #[test]
    fn bad_text_is_refused_with_the_fix() {
        let e = SlotSet::parse(1024, "1-x").unwrap_err().to_string();
        assert!(e.contains("0-99,205"), "{e}");
        let e = SlotSet::parse(1024, "9-3").unwrap_err().to_string();
        assert!(e.contains("3-9"), "{e}");
        let e = SlotSet::parse(1024, "1000-1024").unwrap_err().to_string();
        assert!(e.contains("slot 1024 is out of range (0..1024)"), "{e}");
        assert!(SlotSet::empty(0).is_err());
    }

    proptest! {
        #[test]
        fn display_round_trips(members in proptest::collection::vec(0u32..512, 0..200)) {
            let set = SlotSet::of(512, members.iter().copied()).unwrap();
            let back = SlotSet::parse(512, &set.to_string()).unwrap();
            prop_assert_eq!(&back, &set);
            let from_ranges = SlotSet::of(512, set.ranges().into_iter().flat_map(|(a, b)| a..=b)).unwrap();
            prop_assert_eq!(&from_ranges, &set);
            prop_assert!(set.ranges().windows(2).all(|w| w[0].1 + 1 < w[1].0), "disjoint, not adjacent");
            let mut want = members.clone();
            want.sort_unstable();
            want.dedup();
            prop_assert_eq!(set.iter().collect::<Vec<_>>(), want);
        }
    }
}
