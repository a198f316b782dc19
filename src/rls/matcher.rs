//! Which rule a request descriptor falls under, as envoyproxy/ratelimit
//! decides it (docs/envoy-rls-reference.md, section 2), and which of a
//! request's limits `replaces` drops (section 3). Pure: no counting here.
//!
//! A descriptor's entries walk the tree one level each. At each level the
//! exact value wins, then the first wildcard pattern that matches (in
//! configuration order), then the key alone. Only the node that the last
//! entry reaches gives the limit; a miss deeper down never falls back to
//! a sibling. Unlike the reference, key and value are matched separately
//! (it matches the joined `key_value` text, so `a` + `b_c` and `a_b` + `c`
//! collide there).

use super::config::{Domain, Limit, Rule};

/// A request descriptor's entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The key.
    pub key: String,
    /// The value.
    pub value: String,
}

/// The rule a descriptor falls under.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Matched<'a> {
    /// Its limit.
    pub limit: &'a Limit,
    /// Counted and reported, never enforced.
    pub shadow_mode: bool,
    /// A quota (see [`Rule::quota_mode`]).
    pub quota_mode: bool,
    /// What the descriptor is counted under: per entry, the key and either
    /// its value or, where a `share_threshold` wildcard matched it, the
    /// pattern (so every value it matches shares one counter).
    pub counter: Vec<(String, String)>,
    /// Its name in the metrics, as the reference names its statistics:
    /// each rule's `key` or `key_value` (the rule's value) joined with
    /// `.`; a rule with `value_to_metric` names the request's value
    /// instead, and a limit with `detailed_metric` the whole descriptor as
    /// sent.
    pub metric: String,
}

/// Whether `value` matches `pattern`, where each `*` stands for any run of
/// characters (none included).
pub fn wildcard_match(pattern: &str, value: &str) -> bool {
    let mut parts = pattern.split('*');
    let first = parts.next().unwrap_or_default();
    let Some(mut rest) = value.strip_prefix(first) else {
        return false;
    };
    let mut parts: Vec<&str> = parts.collect();
    let Some(last) = parts.pop() else {
        // No `*`: the whole value must be the pattern.
        return rest.is_empty();
    };
    for part in parts {
        match rest.find(part) {
            Some(at) => rest = &rest[at + part.len()..],
            None => return false,
        }
    }
    rest.len() >= last.len() && rest.ends_with(last)
}

/// The rule of `domain` that `entries` fall under, if any.
pub fn find<'a>(domain: &'a Domain, entries: &[Entry]) -> Option<Matched<'a>> {
    let mut level = &domain.rules;
    let mut counter = Vec::with_capacity(entries.len());
    let mut metric = Vec::with_capacity(entries.len());
    let mut found = None;
    for (i, entry) in entries.iter().enumerate() {
        let same_key = || level.iter().filter(|r| r.key == entry.key);
        let exact = same_key().find(|r| r.value.as_deref() == Some(entry.value.as_str()));
        let wildcard = || {
            same_key().find(|r| {
                r.value
                    .as_deref()
                    .is_some_and(|v| v.contains('*') && wildcard_match(v, &entry.value))
            })
        };
        let rule: &Rule = match exact.or_else(wildcard) {
            Some(rule) => rule,
            None => same_key().find(|r| r.value.is_none())?,
        };
        let shared = rule.share_threshold && rule.value.as_deref() != Some(entry.value.as_str());
        let counted = match (&rule.value, shared) {
            (Some(pattern), true) => pattern.clone(),
            _ => entry.value.clone(),
        };
        counter.push((entry.key.clone(), counted));
        metric.push(match &rule.value {
            _ if rule.value_to_metric => format!("{}_{}", entry.key, entry.value),
            Some(value) => format!("{}_{value}", entry.key),
            None => entry.key.clone(),
        });
        if i + 1 == entries.len() {
            found = Some(rule);
        }
        level = &rule.children;
    }
    let rule = found?;
    let metric = if rule.detailed_metric {
        entries
            .iter()
            .map(|e| format!("{}_{}", e.key, e.value))
            .collect::<Vec<_>>()
            .join(".")
    } else {
        metric.join(".")
    };
    Some(Matched {
        limit: rule.limit.as_ref()?,
        shadow_mode: rule.shadow_mode,
        quota_mode: rule.quota_mode,
        counter,
        metric,
    })
}

/// Drops the limits another limit of the same request replaces: a limit
/// whose name any matched limit lists in `replaces` (replaced ones
/// included) is not counted.
pub fn drop_replaced<'a>(matched: &mut [Option<Matched<'a>>]) {
    let replaced: Vec<&str> = matched
        .iter()
        .flatten()
        .flat_map(|m| m.limit.replaces.iter().map(String::as_str))
        .collect();
    for slot in matched.iter_mut() {
        if slot
            .as_ref()
            .and_then(|m| m.limit.name.as_deref())
            .is_some_and(|name| replaced.contains(&name))
        {
            *slot = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rls::config::{Allowance, Rules, Unit};

    fn domain(yaml: &str) -> Domain {
        let mut rules = Rules::parse(&[("t.yaml".into(), yaml.into())]).unwrap();
        rules.domains.pop_first().unwrap().1
    }

    fn entries(pairs: &[(&str, &str)]) -> Vec<Entry> {
        pairs
            .iter()
            .map(|(k, v)| Entry {
                key: (*k).into(),
                value: (*v).into(),
            })
            .collect()
    }

    fn per_unit(m: &Matched<'_>) -> u32 {
        match m.limit.allowance {
            Allowance::PerUnit { requests_per_unit, .. } => requests_per_unit,
            Allowance::Unlimited => u32::MAX,
        }
    }

    const TREE: &str = "domain: d\n\
        descriptors:\n\
        \x20 - key: api_key\n\
        \x20   rate_limit: { unit: minute, requests_per_unit: 10 }\n\
        \x20   descriptors:\n\
        \x20     - key: model\n\
        \x20       value: llama-3.1-70b\n\
        \x20       rate_limit: { unit: minute, requests_per_unit: 2 }\n\
        \x20     - key: model\n\
        \x20       value: llama-*-8b\n\
        \x20       share_threshold: true\n\
        \x20       rate_limit: { unit: minute, requests_per_unit: 5 }\n\
        \x20     - key: model\n\
        \x20       rate_limit: { unit: minute, requests_per_unit: 7 }\n\
        \x20 - key: api_key\n\
        \x20   value: vip\n\
        \x20   rate_limit: { unlimited: true }\n\
        \x20 - key: path\n\
        \x20   descriptors:\n\
        \x20     - key: method\n\
        \x20       value: POST\n\
        \x20       shadow_mode: true\n\
        \x20       rate_limit: { unit: second, requests_per_unit: 1 }\n";

    #[test]
    fn wildcards_match_runs_of_any_characters_anywhere() {
        assert!(wildcard_match("llama-*", "llama-3.1-8b"));
        assert!(wildcard_match("llama-*-8b", "llama-3.1-8b"));
        assert!(wildcard_match("*-8b", "llama-8b"));
        assert!(wildcard_match("a*b*c", "abc"));
        assert!(wildcard_match("a*b*c", "axxbyyc"));
        assert!(!wildcard_match("a*b*c", "acb"));
        assert!(!wildcard_match("ab*ba", "aba"), "the ends may not overlap");
        assert!(wildcard_match("*", ""));
        assert!(!wildcard_match("exact", "exactly"));
    }

    #[test]
    fn the_most_specific_rule_at_the_descriptors_own_depth_applies() {
        let d = domain(TREE);
        let find = |pairs: &[(&str, &str)]| find(&d, &entries(pairs));
        // The key alone at depth 1; an exact value beats it.
        assert_eq!(find(&[("api_key", "k1")]).map(|m| per_unit(&m)), Some(10));
        assert_eq!(find(&[("api_key", "vip")]).map(|m| per_unit(&m)), Some(u32::MAX));
        // Depth 2: exact, then wildcard, then the key alone.
        assert_eq!(
            find(&[("api_key", "k1"), ("model", "llama-3.1-70b")]).map(|m| per_unit(&m)),
            Some(2)
        );
        assert_eq!(
            find(&[("api_key", "k1"), ("model", "llama-3.1-8b")]).map(|m| per_unit(&m)),
            Some(5)
        );
        assert_eq!(
            find(&[("api_key", "k1"), ("model", "mistral")]).map(|m| per_unit(&m)),
            Some(7)
        );
        // vip matched exactly at depth 1 and has no children: no fallback
        // to the key-only sibling's.
        assert_eq!(find(&[("api_key", "vip"), ("model", "mistral")]), None);
        // A node without a limit limits nothing; too deep matches nothing.
        assert_eq!(find(&[("path", "/v1")]), None);
        assert_eq!(find(&[("api_key", "k1"), ("model", "m"), ("extra", "x")]), None);
        assert_eq!(find(&[("unknown", "x")]), None);
        let post = find(&[("path", "/v1"), ("method", "POST")]).unwrap();
        assert!(post.shadow_mode);
    }

    #[test]
    fn a_shared_wildcard_counts_every_value_it_matches_as_one() {
        let d = domain(TREE);
        let a = find(&d, &entries(&[("api_key", "k1"), ("model", "llama-3.1-8b")])).unwrap();
        let b = find(&d, &entries(&[("api_key", "k1"), ("model", "llama-3.2-8b")])).unwrap();
        assert_eq!(a.counter, b.counter);
        assert_eq!(a.counter[1], ("model".into(), "llama-*-8b".into()));
        // Without share_threshold, each value counts on its own.
        let c = find(&d, &entries(&[("api_key", "k1"), ("model", "mistral")])).unwrap();
        let e = find(&d, &entries(&[("api_key", "k1"), ("model", "qwen")])).unwrap();
        assert_ne!(c.counter, e.counter);
        assert_eq!(
            c.limit.allowance,
            Allowance::PerUnit {
                unit: Unit::Minute,
                requests_per_unit: 7
            }
        );
    }

    #[test]
    fn a_limit_named_in_replaces_is_dropped_for_the_whole_request() {
        let d = domain(
            "domain: d\n\
             descriptors:\n\
             \x20 - key: user\n\
             \x20   rate_limit: { unit: minute, requests_per_unit: 10, name: per_user }\n\
             \x20 - key: premium\n\
             \x20   rate_limit: { unit: minute, requests_per_unit: 100, replaces: [{ name: per_user }] }\n",
        );
        let mut matched = vec![
            find(&d, &entries(&[("user", "u1")])),
            find(&d, &entries(&[("premium", "yes")])),
        ];
        drop_replaced(&mut matched);
        assert!(matched[0].is_none());
        assert_eq!(matched[1].as_ref().map(per_unit), Some(100));
        let mut alone = vec![find(&d, &entries(&[("user", "u1")]))];
        drop_replaced(&mut alone);
        assert!(alone[0].is_some());
    }
}
