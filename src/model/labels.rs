//! Labels of a pod, namespace or node, kept compact.
//!
//! The agent holds the labels of every pod in the cluster (100,000 at the scale it is built
//! for), so their representation is most of its memory. A `BTreeMap<String, String>` costs a
//! whole B-tree leaf (11 slots of two `String`s, about 560 bytes) plus two heap strings per
//! label, whatever the count; these labels are one sorted boxed slice of inline strings
//! (`CompactString` keeps up to 24 bytes without a heap allocation, which covers nearly every
//! label key and value seen in practice), so three labels take one allocation of 144 bytes.
//! Labels are written once on arrival and only read afterwards, so a sorted slice with binary
//! search serves every lookup a map would.

use std::collections::BTreeMap;
use std::fmt;

use compact_str::CompactString;

/// Labels sorted by key, each key once, so everything derived from them is deterministic
/// (iteration, comparison and hashing agree with the map they were read from).
#[derive(Clone, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Labels(Box<[(CompactString, CompactString)]>);

impl Labels {
    /// No labels.
    pub fn new() -> Self {
        Self::default()
    }

    /// The value of `key`, if the label is set.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.position(key).ok().map(|i| self.0[i].1.as_str())
    }

    /// Whether the label `key` is set (with any value).
    pub fn contains_key(&self, key: &str) -> bool {
        self.position(key).is_ok()
    }

    /// Set `key` to `value`, replacing an earlier value.
    pub fn insert(&mut self, key: impl AsRef<str>, value: impl AsRef<str>) {
        let (key, value) = (key.as_ref(), value.as_ref());
        match self.position(key) {
            Ok(i) => self.0[i].1 = value.into(),
            Err(i) => {
                let mut v = std::mem::take(&mut self.0).into_vec();
                v.insert(i, (key.into(), value.into()));
                self.0 = v.into_boxed_slice();
            }
        }
    }

    /// `(key, value)` pairs in key order.
    pub fn iter(&self) -> impl DoubleEndedIterator<Item = (&str, &str)> + ExactSizeIterator {
        self.0.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }

    /// The keys in order.
    pub fn keys(&self) -> impl DoubleEndedIterator<Item = &str> + ExactSizeIterator {
        self.0.iter().map(|(k, _)| k.as_str())
    }

    /// The number of labels.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// No labels set.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    fn position(&self, key: &str) -> Result<usize, usize> {
        self.0.binary_search_by(|(k, _)| k.as_str().cmp(key))
    }
}

impl<K: AsRef<str>, V: AsRef<str>> FromIterator<(K, V)> for Labels {
    /// As a map does: a later pair with the same key replaces the earlier one.
    fn from_iter<I: IntoIterator<Item = (K, V)>>(iter: I) -> Self {
        let mut v: Vec<(CompactString, CompactString)> = iter
            .into_iter()
            .map(|(k, v)| (k.as_ref().into(), v.as_ref().into()))
            .collect();
        // Stable, so equal keys keep their order and the last one can win.
        v.sort_by(|a, b| a.0.cmp(&b.0));
        let mut out: Vec<(CompactString, CompactString)> = Vec::with_capacity(v.len());
        for pair in v {
            match out.last_mut() {
                Some(last) if last.0 == pair.0 => *last = pair,
                _ => out.push(pair),
            }
        }
        Self(out.into_boxed_slice())
    }
}

impl<K: AsRef<str>, V: AsRef<str>, const N: usize> From<[(K, V); N]> for Labels {
    fn from(pairs: [(K, V); N]) -> Self {
        pairs.into_iter().collect()
    }
}

impl From<&BTreeMap<String, String>> for Labels {
    fn from(map: &BTreeMap<String, String>) -> Self {
        // Already sorted and unique.
        Self(
            map.iter()
                .map(|(k, v)| {
                    (
                        CompactString::from(k.as_str()),
                        CompactString::from(v.as_str()),
                    )
                })
                .collect(),
        )
    }
}

impl<'a> IntoIterator for &'a Labels {
    type Item = (&'a str, &'a str);
    type IntoIter = std::iter::Map<
        std::slice::Iter<'a, (CompactString, CompactString)>,
        fn(&'a (CompactString, CompactString)) -> (&'a str, &'a str),
    >;

    fn into_iter(self) -> Self::IntoIter {
        self.0.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }
}

/// As a map, the way the `BTreeMap` these replaced printed.
impl fmt::Debug for Labels {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map().entries(self.iter()).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lookups_agree_with_a_map() {
        let pairs = [("tier", "fe"), ("app", "web"), ("app", "db"), ("a/b", "")];
        let map: BTreeMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let labels: Labels = pairs.into_iter().collect();
        assert_eq!(labels, Labels::from(&map));
        assert_eq!(labels.len(), map.len());
        for key in ["tier", "app", "a/b", "zone", ""] {
            assert_eq!(labels.get(key), map.get(key).map(String::as_str), "{key}");
            assert_eq!(labels.contains_key(key), map.contains_key(key), "{key}");
        }
        let got: Vec<(&str, &str)> = labels.iter().collect();
        let want: Vec<(&str, &str)> = map.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        assert_eq!(got, want);
        assert_eq!(format!("{labels:?}"), format!("{map:?}"));
    }

    #[test]
    fn insert_keeps_the_order_and_replaces() {
        let mut labels = Labels::from([("b", "1")]);
        labels.insert("a", "2");
        labels.insert("c", "3");
        labels.insert("b", "4");
        let got: Vec<(&str, &str)> = labels.iter().collect();
        assert_eq!(got, [("a", "2"), ("b", "4"), ("c", "3")]);
    }

    #[test]
    fn ordering_is_the_maps() {
        let maps = [
            vec![],
            vec![("a", "1")],
            vec![("a", "1"), ("b", "0")],
            vec![("a", "2")],
            vec![("b", "0")],
        ];
        for x in &maps {
            for y in &maps {
                let (lx, ly): (Labels, Labels) =
                    (x.iter().copied().collect(), y.iter().copied().collect());
                let mx: BTreeMap<&str, &str> = x.iter().copied().collect();
                let my: BTreeMap<&str, &str> = y.iter().copied().collect();
                assert_eq!(lx.cmp(&ly), mx.cmp(&my), "{x:?} vs {y:?}");
            }
        }
    }
}
