//! The slot mover's pure parts: the statements it runs, which slot a row belongs to, row
//! digests for verification, and binary-log values turned back into column values.

use cellplane_cells::slot::{slot_for_bytes, Slot};
use cellplane_cells::slot_set::SlotSet;
use mysql_async::Value;
use std::collections::BTreeMap;
use xxhash_rust::xxh3::Xxh3;

/// One column of a moved table, in the table's order (the binary log's order too).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Column {
    pub name: String,
    /// A `TIMESTAMP`: the binary log carries it as seconds since the epoch.
    pub timestamp: bool,
}

/// A user-keyed table as the mover handles it: columns, primary key and the column that
/// holds the user key (whose slot says where a row lives).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TableShape {
    pub name: String,
    pub columns: Vec<Column>,
    /// Indexes into `columns`, in the key's order.
    pub primary: Vec<usize>,
    /// Index into `columns` of the user key.
    pub key: usize,
}

/// `name` quoted as a MariaDB identifier.
pub fn ident(name: &str) -> String {
    format!("`{}`", name.replace('`', "``"))
}

fn placeholders(n: usize) -> String {
    vec!["?"; n].join(",")
}

impl TableShape {
    fn qualified(&self, schema: &str) -> String {
        format!("{}.{}", ident(schema), ident(&self.name))
    }

    fn column_list(&self) -> String {
        self.columns
            .iter()
            .map(|c| ident(&c.name))
            .collect::<Vec<_>>()
            .join(",")
    }

    fn primary_list(&self) -> String {
        self.primary
            .iter()
            .map(|&i| ident(&self.columns[i].name))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Every row (a digest reads them all; the order does not matter to a sum).
    pub fn select_all(&self, schema: &str) -> String {
        format!(
            "SELECT {} FROM {}",
            self.column_list(),
            self.qualified(schema)
        )
    }

    /// The next `batch` rows in primary-key order: after the key given as parameters, or
    /// from the start.
    pub fn select_batch(&self, schema: &str, batch: usize, after: bool) -> String {
        let filter = if after {
            format!(
                " WHERE ({}) > ({})",
                self.primary_list(),
                placeholders(self.primary.len())
            )
        } else {
            String::new()
        };
        format!(
            "SELECT {} FROM {}{filter} ORDER BY {} LIMIT {batch}",
            self.column_list(),
            self.qualified(schema),
            self.primary_list()
        )
    }

    /// Writes `rows` whole rows, replacing the ones whose keys are there already: applying
    /// it twice leaves the same rows, so a copy or a catch-up can be repeated.
    pub fn upsert(&self, schema: &str, rows: usize) -> String {
        let row = format!("({})", placeholders(self.columns.len()));
        let updates = self
            .columns
            .iter()
            .map(|c| format!("{0}=VALUES({0})", ident(&c.name)))
            .collect::<Vec<_>>()
            .join(",");
        format!(
            "INSERT INTO {} ({}) VALUES {} ON DUPLICATE KEY UPDATE {updates}",
            self.qualified(schema),
            self.column_list(),
            vec![row; rows].join(",")
        )
    }

    /// Deletes one row by its primary key (the parameters).
    pub fn delete_by_primary(&self, schema: &str) -> String {
        let filter = self
            .primary
            .iter()
            .map(|&i| format!("{} = ?", ident(&self.columns[i].name)))
            .collect::<Vec<_>>()
            .join(" AND ");
        format!("DELETE FROM {} WHERE {filter}", self.qualified(schema))
    }

    /// The primary key's values of `row`.
    pub fn primary_of(&self, row: &[Value]) -> Vec<Value> {
        self.primary.iter().map(|&i| row[i].clone()).collect()
    }

    /// `row`'s user is in one of `slots`.
    pub fn in_slots(&self, row: &[Value], slots: &SlotSet) -> bool {
        self.slot_of(row, slots.slot_count())
            .is_some_and(|s| slots.contains(s))
    }

    /// The slot of `row`'s user: the hash of the key's bytes (a number is hashed as its
    /// decimal text, the key a router would have read). None for a NULL key.
    pub fn slot_of(&self, row: &[Value], slots: u32) -> Option<Slot> {
        match row.get(self.key)? {
            Value::Bytes(b) => Some(slot_for_bytes(b, slots)),
            Value::Int(n) => Some(slot_for_bytes(n.to_string().as_bytes(), slots)),
            Value::UInt(n) => Some(slot_for_bytes(n.to_string().as_bytes(), slots)),
            _ => None,
        }
    }
}

/// Rows and an order-independent checksum of one table's rows in one slot: equal digests on
/// both sides mean the same rows (up to a 64-bit hash collision), however they were read.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Digest {
    pub rows: u64,
    pub sum: u64,
}

impl Digest {
    pub fn add(&mut self, row: &[Value]) {
        self.rows += 1;
        self.sum = self.sum.wrapping_add(row_hash(row));
    }
}

/// Digests by (table, slot).
pub type Digests = BTreeMap<(String, Slot), Digest>;

/// A hash of a row's values, each tagged with its kind so that no two rows encode alike.
pub fn row_hash(row: &[Value]) -> u64 {
    let mut h = Xxh3::new();
    for v in row {
        match v {
            Value::NULL => h.update(&[0]),
            Value::Bytes(b) => {
                h.update(&[1]);
                h.update(&(b.len() as u64).to_le_bytes());
                h.update(b);
            }
            Value::Int(n) => {
                h.update(&[2]);
                h.update(&n.to_le_bytes());
            }
            Value::UInt(n) => {
                h.update(&[3]);
                h.update(&n.to_le_bytes());
            }
            Value::Float(x) => {
                h.update(&[4]);
                h.update(&x.to_bits().to_le_bytes());
            }
            Value::Double(x) => {
                h.update(&[5]);
                h.update(&x.to_bits().to_le_bytes());
            }
            Value::Date(y, mo, d, hh, mi, s, us) => {
                h.update(&[6]);
                h.update(&y.to_le_bytes());
                h.update(&[*mo, *d, *hh, *mi, *s]);
                h.update(&us.to_le_bytes());
            }
            Value::Time(neg, days, hh, mi, s, us) => {
                h.update(&[7, u8::from(*neg)]);
                h.update(&days.to_le_bytes());
                h.update(&[*hh, *mi, *s]);
                h.update(&us.to_le_bytes());
            }
        }
    }
    h.digest()
}

/// A slot whose rows differ between the source and the target.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mismatch {
    pub table: String,
    pub slot: Slot,
    pub source: Digest,
    pub target: Digest,
}

impl std::fmt::Display for Mismatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} slot {}: source {} rows (checksum {:016x}), target {} rows (checksum {:016x})",
            self.table,
            self.slot,
            self.source.rows,
            self.source.sum,
            self.target.rows,
            self.target.sum
        )
    }
}

/// Every (table, slot) whose digests differ; a side without rows counts as empty.
pub fn compare(source: &Digests, target: &Digests) -> Vec<Mismatch> {
    let keys: std::collections::BTreeSet<&(String, Slot)> =
        source.keys().chain(target.keys()).collect();
    keys.into_iter()
        .filter_map(|k| {
            let s = source.get(k).copied().unwrap_or_default();
            let t = target.get(k).copied().unwrap_or_default();
            (s != t).then(|| Mismatch {
                table: k.0.clone(),
                slot: k.1,
                source: s,
                target: t,
            })
        })
        .collect()
}

/// A `TIMESTAMP` as the binary log carries it (`seconds[.micros]` since the epoch) as the
/// UTC date and time a session in time zone `+00:00` writes and reads. None when it is not
/// such a number.
pub fn utc_timestamp(text: &[u8]) -> Option<Value> {
    let text = std::str::from_utf8(text).ok()?;
    let (secs, micros) = match text.split_once('.') {
        Some((s, frac)) => {
            if frac.is_empty() || frac.len() > 6 || !frac.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            let scale = 10u32.pow(6 - frac.len() as u32);
            (s.parse::<i64>().ok()?, frac.parse::<u32>().ok()? * scale)
        }
        None => (text.parse::<i64>().ok()?, 0),
    };
    if secs < 0 {
        return None;
    }
    if secs == 0 && micros == 0 {
        // MariaDB's zero timestamp.
        return Some(Value::Date(0, 0, 0, 0, 0, 0, 0));
    }
    let (y, m, d) = civil_from_days(secs.div_euclid(86_400));
    let rem = secs.rem_euclid(86_400);
    Some(Value::Date(
        u16::try_from(y).ok()?,
        m as u8,
        d as u8,
        (rem / 3600) as u8,
        (rem % 3600 / 60) as u8,
        (rem % 60) as u8,
        micros,
    ))
}

/// The proleptic Gregorian date of a day count since 1970-01-01 (H. Hinnant's algorithm).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn orders() -> TableShape {
        TableShape {
            name: "orders".into(),
            columns: ["order_id", "user_id", "qty", "persisted_at"]
                .iter()
                .map(|n| Column {
                    name: n.to_string(),
                    timestamp: *n == "persisted_at",
                })
                .collect(),
            primary: vec![0],
            key: 1,
        }
    }

    #[test]
    fn statements_quote_names_and_page_by_the_primary_key() {
        let t = orders();
        assert_eq!(
            t.select_batch("cell`x", 500, true),
            "SELECT `order_id`,`user_id`,`qty`,`persisted_at` FROM `cell``x`.`orders` \
             WHERE (`order_id`) > (?) ORDER BY `order_id` LIMIT 500"
        );
        assert!(!t.select_batch("s", 10, false).contains("WHERE"));
        let up = t.upsert("s", 2);
        assert!(up.contains(
            "VALUES (?,?,?,?),(?,?,?,?) ON DUPLICATE KEY UPDATE `order_id`=VALUES(`order_id`),"
        ));
        assert_eq!(
            t.delete_by_primary("s"),
            "DELETE FROM `s`.`orders` WHERE `order_id` = ?"
        );
        let mut two = t.clone();
        two.primary = vec![1, 0];
        assert!(two
            .select_batch("s", 1, true)
            .contains("WHERE (`user_id`,`order_id`) > (?,?) ORDER BY `user_id`,`order_id`"));
    }

    #[test]
    fn a_rows_slot_is_its_users_slot() {
        let t = orders();
        let row = vec![
            Value::Bytes(b"o1".to_vec()),
            Value::Bytes(b"alice".to_vec()),
            Value::Int(1),
            Value::NULL,
        ];
        // The README's example: alice is in slot 5808 of 16384.
        assert_eq!(t.slot_of(&row, 16384), Some(5808));
        let mut numeric = row.clone();
        numeric[1] = Value::Int(42);
        assert_eq!(
            t.slot_of(&numeric, 16384),
            Some(cellplane_cells::slot::slot_for_key("42", 16384))
        );
        numeric[1] = Value::NULL;
        assert_eq!(t.slot_of(&numeric, 16384), None);
        assert_eq!(t.primary_of(&row), vec![Value::Bytes(b"o1".to_vec())]);
    }

    #[test]
    fn digests_ignore_order_and_see_every_difference() {
        let a = vec![Value::Bytes(b"x".to_vec()), Value::Int(1)];
        let b = vec![Value::Bytes(b"y".to_vec()), Value::Int(2)];
        let (mut one, mut two) = (Digest::default(), Digest::default());
        one.add(&a);
        one.add(&b);
        two.add(&b);
        two.add(&a);
        assert_eq!(one, two);
        // Kinds are tagged: the bytes "1" and the number 1 differ, as do NULL and "".
        assert_ne!(
            row_hash(&[Value::Bytes(b"1".to_vec())]),
            row_hash(&[Value::Int(1)])
        );
        assert_ne!(
            row_hash(&[Value::NULL]),
            row_hash(&[Value::Bytes(Vec::new())])
        );
        // Boundaries are kept: ("ab","c") is not ("a","bc").
        assert_ne!(
            row_hash(&[Value::Bytes(b"ab".to_vec()), Value::Bytes(b"c".to_vec())]),
            row_hash(&[Value::Bytes(b"a".to_vec()), Value::Bytes(b"bc".to_vec())])
        );
    }

    #[test]
    fn compare_names_each_differing_slot() {
        let d = |rows, sum| Digest { rows, sum };
        let source = Digests::from([
            (("orders".into(), 1), d(2, 10)),
            (("orders".into(), 2), d(1, 5)),
            (("profiles".into(), 1), d(1, 7)),
        ]);
        let target = Digests::from([
            (("orders".into(), 1), d(2, 10)),
            (("orders".into(), 2), d(1, 6)),
            (("profiles".into(), 9), d(1, 1)),
        ]);
        let found = compare(&source, &target);
        let keys: Vec<_> = found.iter().map(|m| (m.table.as_str(), m.slot)).collect();
        assert_eq!(keys, [("orders", 2), ("profiles", 1), ("profiles", 9)]);
        assert_eq!(found[1].target, Digest::default());
        assert!(found[0]
            .to_string()
            .starts_with("orders slot 2: source 1 rows"));
        assert!(compare(&source, &source).is_empty());
    }

    #[test]
    fn binlog_timestamps_become_utc_dates() {
        assert_eq!(
            utc_timestamp(b"1700000000.123"),
            Some(Value::Date(2023, 11, 14, 22, 13, 20, 123_000))
        );
        assert_eq!(
            utc_timestamp(b"951782400"),
            Some(Value::Date(2000, 2, 29, 0, 0, 0, 0))
        );
        assert_eq!(utc_timestamp(b"0"), Some(Value::Date(0, 0, 0, 0, 0, 0, 0)));
        assert_eq!(
            utc_timestamp(b"2147483647.999999"),
            Some(Value::Date(2038, 1, 19, 3, 14, 7, 999_999))
        );
        for bad in [&b"x"[..], b"1.", b"1.1234567", b"-5", b"1.-2"] {
            assert_eq!(utc_timestamp(bad), None, "{bad:?}");
        }
    }
}
