//! Versioned cache entries: the rule that keeps cache-aside free of stale reads.
//!
//! The classic race: a reader misses, reads version 1 from MySQL, an update commits version 2
//! and deletes the key, then the reader fills version 1 back; it stays stale until its TTL.
//! Here an update does not delete: it first writes a *write-lock* tombstone (no fills at
//! all), commits to MySQL, then writes a tombstone carrying the committed version. A fill
//! carries the version it read and is refused when the key holds anything newer. The rule
//! is one pure function ([`fill_allowed`]) used by the in-process cache and mirrored in the
//! Redis Lua scripts below (Redis runs them atomically).

use parking_lot::Mutex;
use std::collections::HashMap;
use std::time::{Duration, Instant};

/// What a cache key holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Entry {
    Value {
        version: u64,
        data: String,
    },
    /// Written by an update at `version`; `None` while the update is in flight.
    Tombstone {
        version: Option<u64>,
    },
}

/// May a reader that read `version` from MySQL fill a key that holds `current`?
pub fn fill_allowed(current: Option<&Entry>, version: u64) -> bool {
    match current {
        None => true,
        Some(Entry::Value { version: v, .. }) => version > *v,
        Some(Entry::Tombstone { version: None }) => false,
        Some(Entry::Tombstone { version: Some(v) }) => version >= *v,
    }
}

/// May an update that committed `version` replace `current` with its tombstone? Not when
/// a later update already did (its tombstone or a fill of it is newer).
pub fn tombstone_allowed(current: Option<&Entry>, version: u64) -> bool {
    match current {
        None | Some(Entry::Tombstone { version: None }) => true,
        Some(Entry::Value { version: v, .. }) | Some(Entry::Tombstone { version: Some(v) }) => {
            *v <= version
        }
    }
}

/// Redis encoding: `v<version>:<data>`, `t<version>`, `t-`.
pub fn encode(e: &Entry) -> String {
    match e {
        Entry::Value { version, data } => format!("v{version}:{data}"),
        Entry::Tombstone { version: Some(v) } => format!("t{v}"),
        Entry::Tombstone { version: None } => "t-".into(),
    }
}

pub fn decode(s: &str) -> Option<Entry> {
    let (kind, rest) = s.split_at_checked(1)?;
    match kind {
        "v" => {
            let (version, data) = rest.split_once(':')?;
            Some(Entry::Value {
                version: version.parse().ok()?,
                data: data.into(),
            })
        }
        "t" if rest == "-" => Some(Entry::Tombstone { version: None }),
        "t" => Some(Entry::Tombstone {
            version: Some(rest.parse().ok()?),
        }),
        _ => None,
    }
}

/// KEYS[1]; ARGV: version, data, ttl seconds. Returns 1 when filled. Same rule as
/// [`fill_allowed`].
pub const FILL_SCRIPT: &str = r#"
local cur = redis.call('GET', KEYS[1])
local ver = tonumber(ARGV[1])
if cur then
  local kind = string.sub(cur, 1, 1)
  local rest = string.sub(cur, 2)
  if kind == 't' then
    if rest == '-' then return 0 end
    if ver < tonumber(rest) then return 0 end
  else
    local cv = tonumber(string.match(rest, '^(%d+):'))
    if cv and ver <= cv then return 0 end
  end
end
redis.call('SET', KEYS[1], 'v' .. ARGV[1] .. ':' .. ARGV[2], 'EX', ARGV[3])
return 1
"#;

/// KEYS[1]; ARGV: version, ttl seconds. Same rule as [`tombstone_allowed`].
pub const TOMBSTONE_SCRIPT: &str = r#"
local cur = redis.call('GET', KEYS[1])
local ver = tonumber(ARGV[1])
if cur and string.sub(cur, 2, 2) ~= '-' then
  local cv = tonumber(string.match(string.sub(cur, 2), '^(%d+)'))
  if cv and cv > ver then return 0 end
end
redis.call('SET', KEYS[1], 't' .. ARGV[1], 'EX', ARGV[2])
return 1
"#;

/// A small in-process cache for hot keys only: a key is admitted once it is read
/// `hot_reads_per_sec` times within a second, lives `ttl`, and follows the same version
/// rule as Redis. Bounded: when full, nothing new is admitted until entries expire.
///
/// Staleness: updates through this process invalidate it at once; updates through another
/// replica of the cell are seen after at most `ttl`.
pub struct HotCache {
    ttl: Duration,
    capacity: usize,
    hot_reads: u32,
    inner: Mutex<HotInner>,
}

struct HotInner {
    entries: HashMap<String, (Entry, Instant)>,
    reads: HashMap<String, u32>,
    window_start: Instant,
}

impl HotCache {
    pub fn new(ttl: Duration, capacity: usize, hot_reads_per_sec: u32) -> Self {
        Self {
            ttl,
            capacity,
            hot_reads: hot_reads_per_sec.max(1),
            inner: Mutex::new(HotInner {
                entries: HashMap::new(),
                reads: HashMap::new(),
                window_start: Instant::now(),
            }),
        }
    }

    fn lock(&self) -> parking_lot::MutexGuard<'_, HotInner> {
        // No poisoning: a panic while holding the lock cannot leave the maps half-updated
        // in a way that matters for a cache; keep serving.
        self.inner.lock()
    }

    /// A live value, counting the read towards hotness.
    pub fn get(&self, key: &str) -> Option<(u64, String)> {
        let now = Instant::now();
        let mut g = self.lock();
        if now.duration_since(g.window_start) > Duration::from_secs(1) {
            g.reads.clear();
            g.window_start = now;
        }
        if g.reads.len() < self.capacity {
            *g.reads.entry(key.to_string()).or_default() += 1;
        }
        match g.entries.get(key) {
            Some((Entry::Value { version, data }, exp)) if *exp > now => {
                Some((*version, data.clone()))
            }
            _ => None,
        }
    }

    /// Offers a value read at `version`; kept only for hot keys and if the version rule
    /// allows it.
    pub fn offer(&self, key: &str, version: u64, data: &str) {
        let now = Instant::now();
        let mut g = self.lock();
        if g.reads.get(key).copied().unwrap_or(0) < self.hot_reads {
            return;
        }
        let current = g
            .entries
            .get(key)
            .filter(|(_, exp)| *exp > now)
            .map(|(e, _)| e);
        if !fill_allowed(current, version) {
            return;
        }
        if g.entries.len() >= self.capacity && !g.entries.contains_key(key) {
            g.entries.retain(|_, (_, exp)| *exp > now);
            if g.entries.len() >= self.capacity {
                return;
            }
        }
        let entry = Entry::Value {
            version,
            data: data.into(),
        };
        g.entries.insert(key.into(), (entry, now + self.ttl));
    }

    /// Records an update: `None` while in flight, then the committed version. Tombstones
    /// are kept regardless of hotness and capacity (they are what prevents stale fills).
    pub fn invalidate(&self, key: &str, version: Option<u64>, tombstone_ttl: Duration) {
        let now = Instant::now();
        let mut g = self.lock();
        let current = g
            .entries
            .get(key)
            .filter(|(_, exp)| *exp > now)
            .map(|(e, _)| e);
        if let Some(v) = version {
            if !tombstone_allowed(current, v) {
                return;
            }
        }
        g.entries.insert(
            key.into(),
            (Entry::Tombstone { version }, now + tombstone_ttl),
        );
    }

    /// Forgets every value. Tombstones stay: they still stop stale fills.
    pub fn clear_values(&self) {
        self.lock()
            .entries
            .retain(|_, (e, _)| matches!(e, Entry::Tombstone { .. }));
    }

    pub fn len(&self) -> usize {
        self.lock().entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(version: u64) -> Entry {
        Entry::Value {
            version,
            data: "d".into(),
        }
    }

    #[test]
    fn the_stale_fill_race_is_refused() {
        // Reader read version 1; the update's tombstone (version 2) landed first.
        assert!(!fill_allowed(
            Some(&Entry::Tombstone { version: Some(2) }),
            1
        ));
        assert!(fill_allowed(
            Some(&Entry::Tombstone { version: Some(2) }),
            2
        ));
        // Nothing fills while an update is in flight.
        assert!(!fill_allowed(Some(&Entry::Tombstone { version: None }), 99));
        assert!(!fill_allowed(Some(&v(3)), 3));
        assert!(fill_allowed(Some(&v(3)), 4));
        assert!(fill_allowed(None, 1));
        // A slower, older update does not overwrite a newer one's tombstone.
        assert!(!tombstone_allowed(
            Some(&Entry::Tombstone { version: Some(5) }),
            4
        ));
        assert!(tombstone_allowed(
            Some(&Entry::Tombstone { version: None }),
            4
        ));
        assert!(tombstone_allowed(Some(&v(4)), 4));
    }

    #[test]
    fn encoding_round_trips_and_rejects_garbage() {
        for e in [
            v(7),
            Entry::Value {
                version: 1,
                data: "a:b:{}".into(),
            },
            Entry::Tombstone { version: Some(3) },
            Entry::Tombstone { version: None },
        ] {
            assert_eq!(decode(&encode(&e)), Some(e));
        }
        for bad in ["", "x1", "vx:1", "tt", "v1"] {
            assert_eq!(decode(bad), None, "{bad}");
        }
    }

    #[test]
    fn hot_cache_admits_only_hot_keys_and_honours_tombstones() {
        let c = HotCache::new(Duration::from_secs(60), 10, 3);
        c.get("k");
        c.offer("k", 1, "one");
        assert_eq!(c.get("k"), None, "one read is not hot");
        c.get("k");
        c.offer("k", 1, "one");
        assert_eq!(c.get("k"), Some((1, "one".into())));
        c.invalidate("k", None, Duration::from_secs(60));
        c.offer("k", 2, "two");
        assert_eq!(c.get("k"), None, "no fills while an update is in flight");
        c.invalidate("k", Some(3), Duration::from_secs(60));
        c.offer("k", 2, "stale");
        assert_eq!(c.get("k"), None);
        c.offer("k", 3, "three");
        assert_eq!(c.get("k"), Some((3, "three".into())));
    }

    #[test]
    fn hot_cache_is_bounded() {
        let c = HotCache::new(Duration::from_secs(60), 4, 1);
        for i in 0..10 {
            let k = format!("k{i}");
            c.get(&k);
            c.offer(&k, 1, "x");
        }
        assert!(c.len() <= 4);
    }
}
