//! The versioned price book.
//!
//! A [`PriceVersion`] is immutable once published and takes effect at its
//! `effective_at`. A request is priced by the version in force when it was
//! reserved (and at the time-of-day window of that instant); the context tier
//! is chosen from the actual prompt size at settle. Prices are whole
//! pico-units per token, so a cost is a sum of integer products.

use super::hash::{Map, Set};
use std::sync::Arc;

use jiff::Timestamp;
use jiff::tz::TimeZone;

use super::ids::{ModelId, TierId, VersionId};
use super::money::{Money, Overflow};

/// The kinds of token a request is billed for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TokenKind {
    /// Prompt tokens not served from cache.
    Input,
    /// Prompt tokens served from cache.
    CachedInput,
    /// Prompt tokens written to cache.
    CacheWrite,
    /// Generated tokens, reasoning included.
    Output,
}

impl TokenKind {
    /// Every kind, in the order token sources cover them.
    pub const ALL: [TokenKind; 4] = [
        TokenKind::Input,
        TokenKind::CachedInput,
        TokenKind::CacheWrite,
        TokenKind::Output,
    ];
}

/// Token counts of one request by kind (disjoint kinds).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct Usage {
    /// Prompt tokens not served from cache.
    pub input_tokens: u64,
    /// Prompt tokens served from cache.
    pub cached_input_tokens: u64,
    /// Prompt tokens written to cache.
    pub cache_write_tokens: u64,
    /// Generated tokens.
    pub output_tokens: u64,
}

impl Usage {
    /// The count of one kind.
    pub fn get(&self, kind: TokenKind) -> u64 {
        match kind {
            TokenKind::Input => self.input_tokens,
            TokenKind::CachedInput => self.cached_input_tokens,
            TokenKind::CacheWrite => self.cache_write_tokens,
            TokenKind::Output => self.output_tokens,
        }
    }

    /// Prompt size: every input kind together (selects the context tier).
    pub fn prompt_tokens(&self) -> u64 {
        self.input_tokens + self.cached_input_tokens + self.cache_write_tokens
    }

    /// Every token of the request (what tokens-per-minute limits count).
    pub fn total_tokens(&self) -> u64 {
        self.prompt_tokens() + self.output_tokens
    }
}

/// Per-token prices of each kind, in pico-units.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TokenPrices {
    /// Uncached input.
    pub input: Money,
    /// Cached input.
    pub cached_input: Money,
    /// Cache writes.
    pub cache_write: Money,
    /// Output.
    pub output: Money,
}

impl TokenPrices {
    /// The price of one token of `kind`.
    pub fn get(&self, kind: TokenKind) -> Money {
        match kind {
            TokenKind::Input => self.input,
            TokenKind::CachedInput => self.cached_input,
            TokenKind::CacheWrite => self.cache_write,
            TokenKind::Output => self.output,
        }
    }

    /// Exact cost of `usage`.
    pub fn cost(&self, usage: &Usage) -> Result<Money, Overflow> {
        TokenKind::ALL.iter().try_fold(Money::ZERO, |sum, &kind| {
            sum.checked_add(self.get(kind).checked_mul(usage.get(kind))?)
        })
    }

    fn scaled(&self, percent: u32) -> Option<TokenPrices> {
        let scale = |m: Money| {
            let p = m.picos().checked_mul(i128::from(percent))?;
            (p % 100 == 0).then(|| Money::from_picos(p / 100))
        };
        Some(TokenPrices {
            input: scale(self.input)?,
            cached_input: scale(self.cached_input)?,
            cache_write: scale(self.cache_write)?,
            output: scale(self.output)?,
        })
    }
}

/// The highest accepted price, per million tokens, in currency units. It
/// bounds every product of a price and a token count far inside `i128`.
pub const MAX_PRICE_PER_MILLION: i128 = 1_000_000;

/// Converts a per-million price, bounded by [`MAX_PRICE_PER_MILLION`],
/// to the exact price per token (the configuration and the admin API
/// take prices this way).
pub fn price_per_token(per_million: Money) -> Result<Money, String> {
    if per_million.picos() > MAX_PRICE_PER_MILLION * crate::engine::money::SCALE {
        return Err(format!(
            "price {per_million} per million tokens is above the limit of {MAX_PRICE_PER_MILLION}"
        ));
    }
    per_token(per_million)
}

/// Converts a price per million tokens to the exact price per token.
pub fn per_token(per_million: Money) -> Result<Money, String> {
    if per_million.is_negative() {
        return Err(format!("price {per_million} is negative"));
    }
    let picos = per_million.picos();
    if picos % 1_000_000 != 0 {
        return Err(format!(
            "price {per_million} per million tokens is not a whole number of 10^-12 units per token \
             (use at most 6 decimal places)"
        ));
    }
    Ok(Money::from_picos(picos / 1_000_000))
}

/// The heaviest token weight, in thousandths (one token counting as 1000).
pub const MAX_WEIGHT_MILLI: u32 = 1_000_000;

/// Prices of one model in one service tier.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TierPrices {
    /// Prices below every context tier.
    pub base: TokenPrices,
    /// `(min_prompt_tokens, prices)`, ascending by threshold.
    pub context_tiers: Vec<(u64, TokenPrices)>,
}

impl TierPrices {
    fn for_prompt(&self, prompt_tokens: u64) -> &TokenPrices {
        self.context_tiers
            .iter()
            .rev()
            .find(|(min, _)| prompt_tokens >= *min)
            .map_or(&self.base, |(_, prices)| prices)
    }
}

/// One model of a price version.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ModelPrices {
    /// Thousandths of an allowance/pack token that one token of this model
    /// counts as (1000 = one for one).
    pub weight_milli: u32,
    /// Prices per service tier.
    pub tiers: Map<TierId, TierPrices>,
}

/// A daily time-of-day window with its own price level.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct PriceWindow {
    /// Label, e.g. `off-peak`.
    pub name: String,
    /// Start, minutes after local midnight.
    pub start_minute: u32,
    /// End (exclusive), minutes after local midnight; may wrap midnight.
    pub end_minute: u32,
    /// Time zone the minutes are read in.
    #[serde(with = "jiff::fmt::serde::tz::required")]
    pub time_zone: TimeZone,
    /// Price level in the window, percent of base.
    pub price_percent: u32,
    /// Models it applies to; `None` for all.
    pub models: Option<Set<ModelId>>,
}

impl PriceWindow {
    fn covers(&self, model: &ModelId, at: Timestamp) -> bool {
        if self.models.as_ref().is_some_and(|m| !m.contains(model)) {
            return false;
        }
        let local = at.to_zoned(self.time_zone.clone());
        let minute = u32::from(local.hour().unsigned_abs()) * 60 + u32::from(local.minute().unsigned_abs());
        if self.start_minute <= self.end_minute {
            (self.start_minute..self.end_minute).contains(&minute)
        } else {
            minute >= self.start_minute || minute < self.end_minute
        }
    }
}

/// The prices that apply to one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rates {
    /// Per-token prices after context tier and window.
    pub prices: TokenPrices,
    /// Allowance/pack weight in thousandths.
    pub weight_milli: u32,
}

/// Why a model cannot be priced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unpriced {
    /// No version is in force yet.
    NoVersion,
    /// The version has no entry for the model.
    Model,
    /// The model has no prices for the service tier.
    Tier,
}

/// An immutable version of the price book.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct PriceVersion {
    /// Unique id, named on every usage record it priced.
    pub id: VersionId,
    /// When it takes effect.
    pub effective_at: Timestamp,
    /// Prices per model.
    pub models: Map<ModelId, ModelPrices>,
    /// Time-of-day windows; the first that covers a request applies.
    pub windows: Vec<PriceWindow>,
}

impl PriceVersion {
    /// The rates for `model` in `tier`, for a prompt of `prompt_tokens`,
    /// reserved at `priced_at`.
    pub fn rates(
        &self,
        model: &ModelId,
        tier: &TierId,
        prompt_tokens: u64,
        priced_at: Timestamp,
    ) -> Result<Rates, Unpriced> {
        let model_prices = self.models.get(model).ok_or(Unpriced::Model)?;
        let tier_prices = model_prices.tiers.get(tier).ok_or(Unpriced::Tier)?;
        let base = tier_prices.for_prompt(prompt_tokens);
        let prices = self
            .windows
            .iter()
            .find(|w| w.covers(model, priced_at))
            .and_then(|w| base.scaled(w.price_percent))
            .unwrap_or(*base);
        Ok(Rates {
            prices,
            weight_milli: model_prices.weight_milli,
        })
    }

    /// Checks what types cannot: window prices stay exact, windows are
    /// non-empty, context tiers ascend, weights are positive. Returns every
    /// problem found, each prefixed with where it is.
    pub fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        for (model, mp) in &self.models {
            if mp.weight_milli == 0 || mp.weight_milli > MAX_WEIGHT_MILLI {
                problems.push(format!("models.{model}.token_weight: must be above 0 and at most 1000"));
            }
            for (tier, tp) in &mp.tiers {
                let mut last = 0;
                for (min, _) in &tp.context_tiers {
                    if *min <= last {
                        problems.push(format!(
                            "models.{model}.tiers.{tier}.context_tiers: thresholds must be above zero and ascending"
                        ));
                    }
                    last = *min;
                }
            }
        }
        for (i, w) in self.windows.iter().enumerate() {
            if w.start_minute >= 1440 || w.end_minute >= 1440 || w.start_minute == w.end_minute {
                problems.push(format!(
                    "windows[{i}]: start and end must be distinct minutes in 0..1440"
                ));
            }
            for (model, mp) in &self.models {
                if w.models.as_ref().is_some_and(|m| !m.contains(model)) {
                    continue;
                }
                for (tier, tp) in &mp.tiers {
                    let all = std::iter::once(&tp.base).chain(tp.context_tiers.iter().map(|(_, p)| p));
                    if all.into_iter().any(|p| p.scaled(w.price_percent).is_none()) {
                        problems.push(format!(
                            "windows[{i}]: {}% of a price of {model}/{tier} is not a whole number of 10^-12 units per token",
                            w.price_percent
                        ));
                    }
                }
            }
        }
        problems
    }
}

/// Every published version, ordered by effective time.
#[derive(Debug, Clone, Default)]
pub struct PriceBook {
    versions: Vec<Arc<PriceVersion>>,
}

/// Why a version cannot be published.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PublishError {
    /// The id is taken.
    #[error("price version {0} already exists")]
    Duplicate(VersionId),
    /// Effective before `now`: history is not rewritten.
    #[error("price version {0} takes effect in the past ({1}); versions cannot be retroactive")]
    Retroactive(VersionId, Timestamp),
    /// Fails [`PriceVersion::problems`].
    #[error("invalid price version: {}", .0.join("; "))]
    Invalid(Vec<String>),
}

impl PriceBook {
    /// A book holding `versions` (validated as a whole, without the
    /// retroactivity rule: this is how a configuration seeds history).
    pub fn new(versions: Vec<PriceVersion>) -> Result<PriceBook, PublishError> {
        let mut book = PriceBook::default();
        for v in versions {
            book.insert(v, None)?;
        }
        Ok(book)
    }

    /// Publishes `version`, which may not take effect before `now`.
    pub fn publish(&mut self, version: PriceVersion, now: Timestamp) -> Result<(), PublishError> {
        self.insert(version, Some(now))
    }

    fn insert(&mut self, version: PriceVersion, now: Option<Timestamp>) -> Result<(), PublishError> {
        if self.get(&version.id).is_some() {
            return Err(PublishError::Duplicate(version.id));
        }
        if now.is_some_and(|now| version.effective_at < now) {
            return Err(PublishError::Retroactive(version.id, version.effective_at));
        }
        let problems = version.problems();
        if !problems.is_empty() {
            return Err(PublishError::Invalid(problems));
        }
        let at = self
            .versions
            .partition_point(|v| v.effective_at <= version.effective_at);
        self.versions.insert(at, Arc::new(version));
        Ok(())
    }

    /// The version in force at `now`.
    pub fn in_force(&self, now: Timestamp) -> Option<&Arc<PriceVersion>> {
        let n = self.versions.partition_point(|v| v.effective_at <= now);
        n.checked_sub(1).map(|i| &self.versions[i])
    }

    /// Whether `version` is in the book as it is (a retry of its publish).
    pub fn holds(&self, version: &PriceVersion) -> bool {
        self.get(&version.id).is_some_and(|v| **v == *version)
    }

    /// A version by id.
    pub fn get(&self, id: &VersionId) -> Option<&Arc<PriceVersion>> {
        self.versions.iter().find(|v| &v.id == id)
    }

    /// Every version, oldest effective first.
    pub fn versions(&self) -> &[Arc<PriceVersion>] {
        &self.versions
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn prices(input: i128, cached: i128, write: i128, output: i128) -> TokenPrices {
        TokenPrices {
            input: Money::from_picos(input),
            cached_input: Money::from_picos(cached),
            cache_write: Money::from_picos(write),
            output: Money::from_picos(output),
        }
    }

    pub(crate) fn version(id: &str, at: &str, input: i128, output: i128) -> PriceVersion {
        let mut tiers = Map::default();
        tiers.insert(
            TierId::default_tier(),
            TierPrices {
                base: prices(input, input / 2, input, output),
                context_tiers: vec![],
            },
        );
        let mut models = Map::default();
        models.insert(
            ModelId::parse("m").unwrap(),
            ModelPrices {
                weight_milli: 1000,
                tiers,
            },
        );
        PriceVersion {
            id: VersionId::parse(id).unwrap(),
            effective_at: at.parse().unwrap(),
            models,
            windows: vec![],
        }
    }

    #[test]
    fn per_million_converts_exactly_or_refuses() {
        assert_eq!(per_token("0.15".parse().unwrap()), Ok(Money::from_picos(150_000)));
        assert!(per_token("0.0000001".parse().unwrap()).is_err());
        assert!(per_token("-1".parse().unwrap()).is_err());
    }

    #[test]
    fn version_in_force_follows_effective_time() {
        let book = PriceBook::new(vec![
            version("v2", "2026-02-01T00:00:00Z", 20, 40),
            version("v1", "2026-01-01T00:00:00Z", 10, 20),
        ])
        .unwrap();
        let at = |s: &str| s.parse::<Timestamp>().unwrap();
        assert!(book.in_force(at("2025-12-31T23:59:59Z")).is_none());
        assert_eq!(book.in_force(at("2026-01-31T23:59:59.999Z")).unwrap().id.as_str(), "v1");
        assert_eq!(book.in_force(at("2026-02-01T00:00:00Z")).unwrap().id.as_str(), "v2");
    }

    #[test]
    fn publishing_refuses_duplicates_and_the_past() {
        let mut book = PriceBook::new(vec![version("v1", "2026-01-01T00:00:00Z", 10, 20)]).unwrap();
        let now: Timestamp = "2026-03-01T00:00:00Z".parse().unwrap();
        assert!(matches!(
            book.publish(version("v1", "2026-04-01T00:00:00Z", 1, 1), now),
            Err(PublishError::Duplicate(_))
        ));
        assert!(matches!(
            book.publish(version("v0", "2026-02-01T00:00:00Z", 1, 1), now),
            Err(PublishError::Retroactive(..))
        ));
        book.publish(version("v3", "2026-03-01T00:00:00Z", 1, 1), now).unwrap();
        assert_eq!(book.in_force(now).unwrap().id.as_str(), "v3");
    }

    #[test]
    fn context_tier_follows_prompt_size_and_off_peak_window_applies_locally() {
        let mut v = version("v1", "2026-01-01T00:00:00Z", 100, 400);
        let model = ModelId::parse("m").unwrap();
        let tier = TierId::default_tier();
        v.models
            .get_mut(&model)
            .unwrap()
            .tiers
            .get_mut(&tier)
            .unwrap()
            .context_tiers = vec![(128_000, prices(200, 100, 200, 800))];
        v.windows.push(PriceWindow {
            name: "off-peak".into(),
            start_minute: 22 * 60,
            end_minute: 6 * 60,
            time_zone: TimeZone::get("Europe/Paris").unwrap(),
            price_percent: 50,
            models: None,
        });
        assert!(v.problems().is_empty());
        // 12:00 UTC is 13:00 in Paris: peak.
        let noon: Timestamp = "2026-01-10T12:00:00Z".parse().unwrap();
        assert_eq!(
            v.rates(&model, &tier, 1000, noon).unwrap().prices.output,
            Money::from_picos(400)
        );
        assert_eq!(
            v.rates(&model, &tier, 128_000, noon).unwrap().prices.output,
            Money::from_picos(800)
        );
        // 21:30 UTC is 22:30 in Paris (winter): off-peak, wrapping midnight.
        let late: Timestamp = "2026-01-10T21:30:00Z".parse().unwrap();
        assert_eq!(
            v.rates(&model, &tier, 1000, late).unwrap().prices.output,
            Money::from_picos(200)
        );
        // 05:00 UTC is 06:00 in Paris: the window's end is exclusive.
        let dawn: Timestamp = "2026-01-10T05:00:00Z".parse().unwrap();
        assert_eq!(
            v.rates(&model, &tier, 1000, dawn).unwrap().prices.output,
            Money::from_picos(400)
        );
        assert_eq!(
            v.rates(&ModelId::parse("x").unwrap(), &tier, 1, noon),
            Err(Unpriced::Model)
        );
        assert_eq!(
            v.rates(&model, &TierId::parse("batch").unwrap(), 1, noon),
            Err(Unpriced::Tier)
        );
    }

    #[test]
    fn token_weights_are_bounded() {
        let model = ModelId::parse("m").unwrap();
        for (weight, problems) in [(0, 1), (1, 0), (MAX_WEIGHT_MILLI, 0), (MAX_WEIGHT_MILLI + 1, 1)] {
            let mut v = version("v1", "2026-01-01T00:00:00Z", 1, 1);
            v.models.get_mut(&model).unwrap().weight_milli = weight;
            assert_eq!(v.problems().len(), problems, "weight {weight}");
        }
    }

    #[test]
    fn inexact_window_is_a_problem() {
        let mut v = version("v1", "2026-01-01T00:00:00Z", 101, 400);
        v.windows.push(PriceWindow {
            name: "w".into(),
            start_minute: 0,
            end_minute: 60,
            time_zone: TimeZone::UTC,
            price_percent: 50,
            models: None,
        });
        assert_eq!(v.problems().len(), 1);
    }
}
