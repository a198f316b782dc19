//! Hash maps for the hot path.
//!
//! Every reserve and settle looks up its plan, its model's and tier's
//! prices, its reservation and its request id: with the standard library's
//! SipHash that was an eighth of the instructions of a reserve and its
//! settle. foldhash (hashbrown's default hasher) is several times cheaper
//! on short keys and, seeded at random per map, keeps keys chosen by
//! callers (request ids) from being steered into collisions.

/// A hash map keyed through foldhash.
pub type Map<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;

/// A hash set keyed through foldhash.
pub type Set<T> = std::collections::HashSet<T, foldhash::fast::RandomState>;
