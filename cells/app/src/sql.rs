//! Statement shapes. mysql_async prepares every statement it executes and keeps a small
//! cache of them per connection, so a statement whose text changes with its batch size
//! (an `IN` list, a multi-row `INSERT`) is padded to a power of two: each connection then
//! prepares a handful of shapes instead of one per size, and the cache keeps the hot ones.

/// `items` padded to the next power of two by repeating the last one. A repeated item
/// changes nothing in an `IN` list, nor in an `INSERT IGNORE` (the copy is a duplicate key).
pub fn padded<T: Clone>(mut items: Vec<T>) -> Vec<T> {
    if let Some(last) = items.last().cloned() {
        items.resize(padded_len(items.len()), last);
    }
    items
}

/// The length a batch of `n` is padded to: the next power of two.
pub fn padded_len(n: usize) -> usize {
    n.max(1).next_power_of_two()
}

/// `n` comma-separated copies of `mark` (`?` for an `IN` list, `(?, ?)` for rows).
pub fn repeated(mark: &str, n: usize) -> String {
    vec![mark; n].join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_are_padded_to_powers_of_two_with_the_last_item() {
        let lens: Vec<usize> = [0, 1, 2, 3, 5, 8, 9, 33, 64].map(padded_len).into();
        assert_eq!(lens, [1, 1, 2, 4, 8, 8, 16, 64, 64]);
        assert_eq!(padded(vec!["a", "b", "c"]), ["a", "b", "c", "c"]);
        assert_eq!(padded(vec![1, 2]), [1, 2]);
        assert!(padded(Vec::<u8>::new()).is_empty());
    }

    #[test]
    fn marks_are_comma_separated() {
        assert_eq!(repeated("?", 1), "?");
        assert_eq!(repeated("?", 3), "?, ?, ?");
        assert_eq!(repeated("(?, ?)", 2), "(?, ?), (?, ?)");
    }
}
