//! The rate-limit rules of the Envoy rate-limit service, in the
//! configuration format of envoyproxy/ratelimit: YAML files, one domain
//! each, read from a directory.
//!
//! ```yaml
//! domain: inference
//! descriptors:
//!   - key: api_key
//!     rate_limit: { unit: minute, requests_per_unit: 60 }
//!     descriptors:
//!       - key: model
//!         value: llama-3.1-70b
//!         rate_limit: { unit: minute, requests_per_unit: 10 }
//! ```
//!
//! Loading checks every file and reports every problem, each with the file
//! and the path of the offending value; nothing is loaded if any is found.

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;

use serde::Deserialize;

/// A window unit. Windows are fixed and counted in whole seconds from the
/// Unix epoch, as the reference counts them: a week is 604,800 seconds (so
/// weeks start on Thursdays, UTC), a month 30 days and a year 365 days.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Unit {
    /// One second.
    Second,
    /// One minute.
    Minute,
    /// One hour.
    Hour,
    /// One day (UTC).
    Day,
    /// Seven days.
    Week,
    /// Thirty days.
    Month,
    /// 365 days.
    Year,
}

impl Unit {
    fn parse(text: &str) -> Option<Unit> {
        Some(match text.to_ascii_lowercase().as_str() {
            "second" => Unit::Second,
            "minute" => Unit::Minute,
            "hour" => Unit::Hour,
            "day" => Unit::Day,
            "week" => Unit::Week,
            "month" => Unit::Month,
            "year" => Unit::Year,
            _ => return None,
        })
    }
}

impl Unit {
    /// The window's length in seconds.
    pub fn seconds(self) -> i64 {
        match self {
            Unit::Second => 1,
            Unit::Minute => 60,
            Unit::Hour => 3_600,
            Unit::Day => 86_400,
            Unit::Week => 604_800,
            Unit::Month => 2_592_000,
            Unit::Year => 31_536_000,
        }
    }

    /// The window `now` falls in: its start (seconds since the epoch) and
    /// the seconds left until the next one starts.
    pub fn window(self, now: jiff::Timestamp) -> (i64, i64) {
        let length = self.seconds();
        let at = now.as_second();
        let start = at.div_euclid(length) * length;
        (start, start + length - at)
    }
}

impl fmt::Display for Unit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Unit::Second => "second",
            Unit::Minute => "minute",
            Unit::Hour => "hour",
            Unit::Day => "day",
            Unit::Week => "week",
            Unit::Month => "month",
            Unit::Year => "year",
        })
    }
}

/// What a rule allows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Allowance {
    /// No limit.
    Unlimited,
    /// At most `requests_per_unit` hits per window of `unit`.
    PerUnit {
        /// The window.
        unit: Unit,
        /// Hits per window.
        requests_per_unit: u32,
    },
}

/// A rule's limit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limit {
    /// What it allows.
    pub allowance: Allowance,
    /// Its name, for `replaces`.
    pub name: Option<String>,
    /// Names of limits this one replaces when both apply to one request.
    pub replaces: Vec<String>,
}

/// One node of a domain's descriptor tree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    /// The entry key it matches.
    pub key: String,
    /// The value it matches: exact, with `*` wildcards, or any (`None`).
    pub value: Option<String>,
    /// The limit of a request descriptor that ends here, if any.
    pub limit: Option<Limit>,
    /// Rules for the entries that follow.
    pub children: Vec<Rule>,
    /// Counted and reported, never enforced.
    pub shadow_mode: bool,
    /// A quota: over its limit, it is reported over, but the request is
    /// over only if every quota descriptor of it is (or another limit is).
    pub quota_mode: bool,
    /// Wildcard values that match share one counter (rather than one per
    /// value).
    pub share_threshold: bool,
    /// Metrics name the matched value (statistics only).
    pub detailed_metric: bool,
    /// Metrics include the request's values (statistics only).
    pub value_to_metric: bool,
}

/// One domain's rules.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Domain {
    /// Its name, as Envoy sends it.
    pub name: String,
    /// The top of its descriptor tree.
    pub rules: Vec<Rule>,
}

/// How the service answers beyond the rules (`[rls]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RlsSettings {
    /// Global shadow mode: count and report, but the overall answer is
    /// always OK.
    pub shadow_mode: bool,
    /// Add `x-ratelimit-limit`, `-remaining` and `-reset` to the response
    /// headers, for the most constrained descriptor.
    pub response_headers: bool,
    /// Windows of Envoy's own per-descriptor limits (`limit` overrides)
    /// this sidecar opens at most at once: their keys and lengths (up to a
    /// year) are the caller's choice, so they get a budget of their own
    /// and can never crowd out the rules' windows.
    pub max_override_windows: usize,
}

impl Default for RlsSettings {
    fn default() -> Self {
        RlsSettings {
            shadow_mode: false,
            response_headers: false,
            max_override_windows: MAX_OVERRIDE_WINDOWS,
        }
    }
}

/// [`RlsSettings::max_override_windows`] by default.
pub const MAX_OVERRIDE_WINDOWS: usize = 100_000;

/// The rules and settings in force together.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct InForce {
    /// The rules.
    pub rules: Rules,
    /// The settings.
    pub settings: RlsSettings,
}

/// What is in force, swapped whole by a reload (requests in flight keep
/// the `Arc` they took).
pub type RulesCell = std::sync::RwLock<std::sync::Arc<InForce>>;

/// Every domain, by name.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Rules {
    /// The domains.
    pub domains: BTreeMap<String, Domain>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DomainFile {
    domain: String,
    #[serde(default)]
    descriptors: Vec<DescriptorFile>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DescriptorFile {
    key: String,
    value: Option<String>,
    rate_limit: Option<RateLimitFile>,
    #[serde(default)]
    descriptors: Vec<DescriptorFile>,
    #[serde(default)]
    shadow_mode: bool,
    #[serde(default)]
    quota_mode: bool,
    #[serde(default)]
    share_threshold: bool,
    /// Accepted and ignored (the reference returns it as dynamic metadata).
    #[serde(default, rename = "metadata")]
    _metadata: Option<serde::de::IgnoredAny>,
    #[serde(default)]
    detailed_metric: bool,
    #[serde(default)]
    value_to_metric: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RateLimitFile {
    unit: Option<String>,
    requests_per_unit: Option<u32>,
    #[serde(default)]
    unlimited: bool,
    name: Option<String>,
    #[serde(default)]
    replaces: Vec<ReplacesFile>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ReplacesFile {
    name: String,
}

impl Rules {
    /// Reads every `*.yaml` and `*.yml` file in `dir`: every problem
    /// found, each prefixed with its file and path, if any.
    pub fn load_dir(dir: &Path) -> Result<Rules, Vec<String>> {
        let entries = std::fs::read_dir(dir).map_err(|e| vec![format!("{}: {e}", dir.display())])?;
        let mut files: Vec<_> = entries
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "yaml" || x == "yml"))
            .collect();
        files.sort();
        let mut texts = Vec::new();
        let mut problems = Vec::new();
        for file in files {
            match std::fs::read_to_string(&file) {
                Ok(text) => texts.push((file.display().to_string(), text)),
                Err(e) => problems.push(format!("{}: {e}", file.display())),
            }
        }
        match Rules::parse(&texts) {
            Ok(rules) if problems.is_empty() => Ok(rules),
            Ok(_) => Err(problems),
            Err(more) => Err(problems.into_iter().chain(more).collect()),
        }
    }

    /// Parses `(name, text)` files: every problem found, if any.
    pub fn parse(files: &[(String, String)]) -> Result<Rules, Vec<String>> {
        let mut rules = Rules::default();
        let mut problems = Vec::new();
        for (file, text) in files {
            let parsed: DomainFile = match serde_saphyr::from_str(text) {
                Ok(parsed) => parsed,
                Err(e) => {
                    problems.push(format!("{file}: {e}"));
                    continue;
                }
            };
            if parsed.domain.trim().is_empty() {
                problems.push(format!("{file}: domain: must not be empty"));
                continue;
            }
            let mut push = |path: String, message: String| problems.push(format!("{file}: {path}: {message}"));
            let domain = Domain {
                name: parsed.domain.clone(),
                rules: descriptors(&mut push, "descriptors", &parsed.descriptors),
            };
            if rules.domains.insert(parsed.domain.clone(), domain).is_some() {
                problems.push(format!(
                    "{file}: domain: {} is defined by another file too",
                    parsed.domain
                ));
            }
        }
        if problems.is_empty() { Ok(rules) } else { Err(problems) }
    }
}

fn descriptors(push: &mut impl FnMut(String, String), path: &str, files: &[DescriptorFile]) -> Vec<Rule> {
    let mut seen = BTreeMap::new();
    let mut out = Vec::new();
    for (i, d) in files.iter().enumerate() {
        let at = format!("{path}[{i}]");
        if d.key.is_empty() {
            push(format!("{at}.key"), "must not be empty".into());
        }
        if seen.insert((d.key.clone(), value(d)), i).is_some() {
            let value = d.value.as_deref().unwrap_or("(any)");
            push(
                at.clone(),
                format!("key {} with value {value} appears twice at this level", d.key),
            );
        }
        if d.share_threshold && !value(d).is_some_and(|v| v.contains('*')) {
            push(
                format!("{at}.share_threshold"),
                "applies to wildcard values only (a value with *)".into(),
            );
        }
        let limit = d
            .rate_limit
            .as_ref()
            .and_then(|r| limit(push, &format!("{at}.rate_limit"), r));
        out.push(Rule {
            key: d.key.clone(),
            value: value(d),
            limit,
            children: descriptors(push, &format!("{at}.descriptors"), &d.descriptors),
            shadow_mode: d.shadow_mode,
            quota_mode: d.quota_mode,
            share_threshold: d.share_threshold,
            detailed_metric: d.detailed_metric,
            value_to_metric: d.value_to_metric,
        });
    }
    out
}

/// A rule's value; an empty one is none (the key's default), as the
/// reference reads it.
fn value(d: &DescriptorFile) -> Option<String> {
    d.value.clone().filter(|v| !v.is_empty())
}

fn limit(push: &mut impl FnMut(String, String), at: &str, r: &RateLimitFile) -> Option<Limit> {
    // As the reference: a unit beside `unlimited` is an error, a
    // requests_per_unit is ignored.
    let allowance = if r.unlimited {
        if r.unit.is_some() {
            push(format!("{at}.unit"), "an unlimited rate limit has no unit".into());
            return None;
        }
        Allowance::Unlimited
    } else {
        let unit = match r.unit.as_deref().map(|u| (u, Unit::parse(u))) {
            Some((_, Some(unit))) => unit,
            Some((text, None)) => {
                push(
                    format!("{at}.unit"),
                    format!("expected second, minute, hour, day, week, month or year, got {text:?}"),
                );
                return None;
            }
            None => {
                push(format!("{at}.unit"), "is required (or unlimited: true)".into());
                return None;
            }
        };
        let Some(requests_per_unit) = r.requests_per_unit else {
            push(
                format!("{at}.requests_per_unit"),
                "is required (or unlimited: true)".into(),
            );
            return None;
        };
        Allowance::PerUnit {
            unit,
            requests_per_unit,
        }
    };
    if r.replaces.iter().any(|n| n.name.is_empty()) {
        push(format!("{at}.replaces"), "every entry needs a name".into());
    }
    if r.name
        .as_deref()
        .is_some_and(|own| r.replaces.iter().any(|n| n.name == own))
    {
        push(format!("{at}.replaces"), "a limit cannot replace itself".into());
    }
    Some(Limit {
        allowance,
        name: r.name.clone().filter(|n| !n.is_empty()),
        replaces: r.replaces.iter().map(|n| n.name.clone()).collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Rules, Vec<String>> {
        Rules::parse(&[("test.yaml".into(), text.into())])
    }

    #[test]
    fn the_reference_format_parses_into_a_tree() {
        let rules = parse(
            "domain: inference\n\
             descriptors:\n\
             \x20 - key: api_key\n\
             \x20   rate_limit: { unit: minute, requests_per_unit: 60, name: per_key }\n\
             \x20   descriptors:\n\
             \x20     - key: model\n\
             \x20       value: llama-*\n\
             \x20       share_threshold: true\n\
             \x20       rate_limit: { unit: second, requests_per_unit: 5, replaces: [{ name: per_key }] }\n\
             \x20 - key: internal\n\
             \x20   rate_limit: { unlimited: true }\n\
             \x20   shadow_mode: true\n",
        )
        .unwrap();
        let domain = &rules.domains["inference"];
        assert_eq!(domain.rules.len(), 2);
        let key = &domain.rules[0];
        assert_eq!(key.limit.as_ref().unwrap().name.as_deref(), Some("per_key"));
        let model = &key.children[0];
        assert_eq!(model.value.as_deref(), Some("llama-*"));
        assert!(model.share_threshold);
        assert_eq!(
            model.limit.as_ref().unwrap().allowance,
            Allowance::PerUnit {
                unit: Unit::Second,
                requests_per_unit: 5
            }
        );
        assert_eq!(model.limit.as_ref().unwrap().replaces, ["per_key"]);
        assert_eq!(domain.rules[1].limit.as_ref().unwrap().allowance, Allowance::Unlimited);
        assert!(domain.rules[1].shadow_mode);
    }

    #[test]
    fn the_example_rules_load() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/rls");
        let rules = Rules::load_dir(&dir).unwrap();
        assert!(rules.domains.contains_key("inference"));
    }

    #[test]
    fn windows_are_fixed_from_the_epoch() {
        let at = |s: &str| s.parse::<jiff::Timestamp>().unwrap();
        assert_eq!(Unit::Minute.window(at("2026-11-29T12:00:59Z")).1, 1);
        assert_eq!(Unit::Minute.window(at("2026-11-29T12:01:00Z")).1, 60);
        let (start, left) = Unit::Day.window(at("2026-11-29T18:00:00Z"));
        assert_eq!((start, left), (at("2026-11-29T00:00:00Z").as_second(), 6 * 3600));
        // 1970-01-01 was a Thursday: so is every week's first day.
        let (start, _) = Unit::Week.window(at("2026-11-29T12:00:00Z"));
        assert_eq!(
            jiff::Timestamp::from_second(start).unwrap().to_string(),
            "2026-11-26T00:00:00Z"
        );
        assert_eq!(Unit::Second.window(at("2026-11-29T12:00:00.900Z")).1, 1);
    }

    #[test]
    fn every_problem_is_reported_with_its_path() {
        let problems = parse(
            "domain: d\n\
             descriptors:\n\
             \x20 - key: a\n\
             \x20   rate_limit: { unit: fortnight, requests_per_unit: 1 }\n\
             \x20 - key: a\n\
             \x20   rate_limit: { unlimited: true, unit: second }\n\
             \x20 - key: b\n\
             \x20   rate_limit: { unit: second }\n",
        )
        .unwrap_err();
        assert_eq!(problems.len(), 4, "{problems:#?}");
        assert!(problems[0].contains("descriptors[0].rate_limit.unit") && problems[0].contains("fortnight"));
        assert!(
            problems
                .iter()
                .any(|p| p.contains("descriptors[1]") && p.contains("twice"))
        );
        assert!(
            problems
                .iter()
                .any(|p| p.contains("descriptors[1].rate_limit.unit") && p.contains("unlimited"))
        );
        assert!(
            problems
                .iter()
                .any(|p| p.contains("descriptors[2].rate_limit.requests_per_unit"))
        );
        assert!(parse("domain: d\ndescriptors:\n  - key: a\n    colour: red\n").is_err());
        let shared_exact = "domain: d\ndescriptors:\n  - key: a\n    value: b\n    share_threshold: true\n";
        assert!(parse(shared_exact).unwrap_err()[0].contains("share_threshold"));
        let itself = "domain: d\ndescriptors:\n  - key: a\n    rate_limit: { unlimited: true, name: n, replaces: [{ name: n }] }\n";
        assert!(parse(itself).unwrap_err()[0].contains("itself"));
        let with_metadata = "domain: d\ndescriptors:\n  - key: a\n    metadata: { team: billing, tags: [x] }\n";
        assert!(
            parse(with_metadata).is_ok(),
            "metadata is accepted, as the reference accepts it"
        );
        let empty = "domain: d\ndescriptors:\n  - key: a\n  - key: a\n    value: \"\"\n";
        assert!(
            parse(empty).unwrap_err()[0].contains("twice"),
            "an empty value is no value"
        );
        let ignored =
            "domain: d\ndescriptors:\n  - key: a\n    rate_limit: { unlimited: true, requests_per_unit: 5 }\n";
        assert!(
            parse(ignored).is_ok(),
            "requests_per_unit beside unlimited is ignored, as the reference does"
        );
        assert!(parse("descriptors: []\n").is_err(), "a domain is required");
        let two = Rules::parse(&[
            ("a.yaml".into(), "domain: d\n".into()),
            ("b.yaml".into(), "domain: d\n".into()),
        ]);
        assert!(two.unwrap_err()[0].contains("another file"));
    }
}
