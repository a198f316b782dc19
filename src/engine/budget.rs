//! Budgets: caps on what one API key, or one project (a group of an
//! account's keys), may spend in a period, in money and in tokens.
//!
//! A budget counts in slots of time in the account's time zone: a calendar
//! month, a day, or (for a rolling 30 days) each of the last 30 days. Each
//! slot is a limit bucket of its own (scope [`Scope::KeyBudget`] or
//! [`Scope::ProjectBudget`], id `"<key or project>#<slot>"`), so a budget
//! leases to sidecars exactly as rate-limit tokens do (see
//! `engine::lease`): a sidecar holds permits of the current slot and spends
//! them from memory, and what it gives back goes to the slot it was taken
//! from, never to a later one. A reserve takes its worst case (tokens, and
//! the money its holds cost) from every budget that applies; settle,
//! release and lapse correct that to what was spent. Usage beyond a grant
//! and one-shot charges are counted without a check (the work is done), as
//! tokens-per-minute limits count them.
//!
//! Why one file: a budget's slots, its room on a stand-alone, shared or
//! mirrored account, and what the shared side lends must agree to the
//! unit; read side by side, with their tests, that is checked.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use jiff::civil::Date;
use jiff::tz::TimeZone;
use jiff::{Timestamp, ToSpan};

use super::ids::{ApiKeyId, ProjectId};
use super::limits::{Bucket, BucketKey, Buckets, Lacking, Permits, Scope, Used};
use super::money::{MAX_OPERATION, Money};
use super::period::PeriodError;

/// The days a rolling budget counts.
pub const ROLLING_DAYS: i64 = 30;

/// The most tokens a budget may allow per period (10^15).
pub const MAX_BUDGET_TOKENS: u64 = 1_000_000_000_000_000;

/// Budgets one account may set, keys and projects together: each costs a
/// lookup on its keys' reserves and a bucket per slot.
pub const MAX_BUDGETS: usize = 1_024;

/// How a budget's period is cut, in the account's time zone.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BudgetPeriod {
    /// The calendar month.
    Month,
    /// The calendar day.
    Day,
    /// The last 30 days, today included.
    #[serde(rename = "rolling_30_days")]
    Rolling30Days,
}

impl BudgetPeriod {
    /// The name used in the API and the command line.
    pub fn name(self) -> &'static str {
        match self {
            BudgetPeriod::Month => "month",
            BudgetPeriod::Day => "day",
            BudgetPeriod::Rolling30Days => "rolling_30_days",
        }
    }

    /// Reads [`BudgetPeriod::name`].
    pub fn parse(text: &str) -> Result<BudgetPeriod, String> {
        match text {
            "month" => Ok(BudgetPeriod::Month),
            "day" => Ok(BudgetPeriod::Day),
            "rolling_30_days" => Ok(BudgetPeriod::Rolling30Days),
            other => Err(format!(
                "unknown budget period {other:?}: use month, day or rolling_30_days"
            )),
        }
    }
}

/// A cap per period, in money, tokens (input of all kinds and output), or
/// both.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Budget {
    /// The period.
    pub period: BudgetPeriod,
    /// Money per period.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub money: Option<Money>,
    /// Tokens per period.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens: Option<u64>,
}

impl Budget {
    /// Checks the figures; `field` names the budget in the message.
    fn check(&self, field: &str) -> Result<(), String> {
        if self.money.is_none() && self.tokens.is_none() {
            return Err(format!("{field}: sets neither money nor tokens"));
        }
        if let Some(m) = self.money
            && (!m.is_positive() || m > MAX_OPERATION)
        {
            return Err(format!("{field}: money must be above 0 and at most {MAX_OPERATION}"));
        }
        if let Some(t) = self.tokens
            && !(1..=MAX_BUDGET_TOKENS).contains(&t)
        {
            return Err(format!("{field}: tokens must be 1 to {MAX_BUDGET_TOKENS}"));
        }
        Ok(())
    }
}

/// A group of an account's API keys, with an optional budget over all of
/// them.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Project {
    /// Its keys.
    #[serde(skip_serializing_if = "BTreeSet::is_empty")]
    pub keys: BTreeSet<ApiKeyId>,
    /// Its budget.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub budget: Option<Budget>,
}

/// An account's budgets: per API key, and per project.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Budgets {
    /// Budgets of single keys.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub keys: BTreeMap<ApiKeyId, Budget>,
    /// Projects, by id.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub projects: BTreeMap<ProjectId, Project>,
}

/// One budget as it applies now: what it caps, and the bucket of the
/// current slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applying {
    /// The key's or the project's budget.
    pub scope: Scope,
    /// The key or project.
    pub id: Arc<str>,
    /// Its figures.
    pub budget: Budget,
    /// The current slot's bucket.
    pub bucket: BucketKey,
    /// The current slot's first day.
    pub day: Date,
    /// When the current slot ends.
    pub ends: Timestamp,
}

/// What a budget has counted in its window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Counted {
    /// Tokens and money counted: spent, held by open holds, lent.
    pub used: Used,
    /// Of those, what usage records charged (settled spend).
    pub spent: Used,
    /// Since when: the start of the current month or day, or of the
    /// oldest day a rolling window counted.
    pub since: Timestamp,
    /// When counting starts afresh or, for a rolling window, the first
    /// instant some of what is counted drops out of it.
    pub resets_at: Timestamp,
}

/// Which budget denied a request, and until when.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exhausted {
    /// A key's or a project's budget.
    pub scope: Scope,
    /// The key or project.
    pub id: Arc<str>,
    /// The period.
    pub period: BudgetPeriod,
    /// Money (true) or tokens ran out.
    pub money: bool,
    /// The cap: pico-units or tokens.
    pub limit: i128,
    /// When it has room again at the earliest.
    pub resets_at: Timestamp,
}

impl std::fmt::Display for Exhausted {
    /// For people: "money budget of 10 per month on the API key k1 is used
    /// up until 2027-01-01T00:00:00Z".
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (what, limit) = if self.money {
            ("money", Money::from_picos(self.limit).to_string())
        } else {
            ("token", self.limit.to_string())
        };
        let whose = match self.scope {
            Scope::ProjectBudget => "project",
            _ => "API key",
        };
        write!(
            f,
            "{what} budget of {limit} per {} on the {whose} {} is used up until {}",
            self.period.name().replace('_', " "),
            self.id,
            self.resets_at
        )
    }
}

/// What a hold counts in budgets: the budgets, as they applied when it
/// was admitted, and the money it counted (what its takes hold; its tokens
/// are the hold's admitted tokens).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Counting {
    /// The budgets.
    pub applying: Vec<Applying>,
    /// Money, pico-units.
    pub money: i128,
}

/// Room left under the budgets that apply, per unit; `None` where none caps.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Room {
    /// Tokens.
    pub tokens: Option<i128>,
    /// Money, pico-units.
    pub money: Option<i128>,
}

impl Room {
    /// Whether `tokens` and `money` fit.
    pub fn fits(&self, tokens: u64, money: i128) -> bool {
        self.tokens.is_none_or(|r| i128::from(tokens) <= r) && self.money.is_none_or(|r| money <= r)
    }

    fn narrow(&mut self, tokens: Option<i128>, money: Option<i128>) {
        let min = |a: Option<i128>, b: Option<i128>| match (a, b) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        self.tokens = min(self.tokens, tokens);
        self.money = min(self.money, money);
    }
}

impl Budgets {
    /// Nothing set.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty() && self.projects.is_empty()
    }

    /// Checks every budget, that no key is in two projects, and the count;
    /// says what is wrong.
    pub fn check(&self) -> Result<(), String> {
        let count = self.keys.len() + self.projects.len();
        if count > MAX_BUDGETS {
            return Err(format!("{count} keys and projects, more than {MAX_BUDGETS}"));
        }
        for (key, budget) in &self.keys {
            budget.check(&format!("key {key}"))?;
        }
        let members: usize = self.projects.values().map(|p| p.keys.len()).sum();
        if members > MAX_BUDGETS {
            return Err(format!("{members} keys in projects, more than {MAX_BUDGETS}"));
        }
        let mut member: BTreeMap<&ApiKeyId, &ProjectId> = BTreeMap::new();
        for (id, project) in &self.projects {
            if let Some(budget) = &project.budget {
                budget.check(&format!("project {id}"))?;
            }
            for key in &project.keys {
                if let Some(other) = member.insert(key, id) {
                    return Err(format!(
                        "key {key} is in projects {other} and {id}; a key is in one at most"
                    ));
                }
            }
        }
        Ok(())
    }

    /// The project `key` belongs to.
    pub fn project_of(&self, key: &ApiKeyId) -> Option<(&ProjectId, &Project)> {
        self.projects.iter().find(|(_, p)| p.keys.contains(key))
    }

    /// The budgets a request by `key` meets at `now`: the key's, then its
    /// project's.
    pub fn applying(&self, key: &ApiKeyId, time_zone: &TimeZone, now: Timestamp) -> Result<Vec<Applying>, PeriodError> {
        let mut out = Vec::new();
        if let Some(budget) = self.keys.get(key) {
            out.push(applying(Scope::KeyBudget, key.shared(), *budget, time_zone, now)?);
        }
        if let Some((
            id,
            Project {
                budget: Some(budget), ..
            },
        )) = self.project_of(key)
        {
            out.push(applying(Scope::ProjectBudget, id.shared(), *budget, time_zone, now)?);
        }
        Ok(out)
    }

    /// Every budget as it applies at `now` (for read-outs).
    pub fn all(&self, time_zone: &TimeZone, now: Timestamp) -> Result<Vec<Applying>, PeriodError> {
        let keys = self.keys.iter().map(|(k, b)| (Scope::KeyBudget, k.shared(), *b));
        let projects = self
            .projects
            .iter()
            .filter_map(|(p, project)| Some((Scope::ProjectBudget, p.shared(), project.budget?)));
        keys.chain(projects)
            .map(|(scope, id, budget)| applying(scope, id, budget, time_zone, now))
            .collect()
    }

    /// The budget whose current slot `key` names, if it is a budget's
    /// bucket and that slot is current at `now` (a sidecar asking for a
    /// slot already over, or not begun, is lent nothing).
    pub fn of_bucket(&self, key: &BucketKey, time_zone: &TimeZone, now: Timestamp) -> Option<Applying> {
        let (id, _) = key.id.split_once('#')?;
        let budget = match key.scope {
            Scope::KeyBudget => *self.keys.get(&ApiKeyId::parse(id).ok()?)?,
            Scope::ProjectBudget => self.projects.get(&ProjectId::parse(id).ok()?)?.budget?,
            _ => return None,
        };
        let a = applying(key.scope, Arc::from(id), budget, time_zone, now).ok()?;
        (a.bucket == *key).then_some(a)
    }
}

/// The bucket of `id`'s slot starting on `day`.
fn slot_key(scope: Scope, id: &str, period: BudgetPeriod, day: Date) -> BucketKey {
    let label = match period {
        BudgetPeriod::Month => format!("{:04}-{:02}", day.year(), day.month()),
        BudgetPeriod::Day | BudgetPeriod::Rolling30Days => day.to_string(),
    };
    BucketKey {
        scope,
        id: Arc::from(format!("{id}#{label}")),
    }
}

/// The first instant of `day` in `time_zone`.
fn start_of(day: Date, time_zone: &TimeZone) -> Result<Timestamp, PeriodError> {
    Ok(day.to_zoned(time_zone.clone())?.start_of_day()?.timestamp())
}

fn applying(
    scope: Scope,
    id: Arc<str>,
    budget: Budget,
    time_zone: &TimeZone,
    now: Timestamp,
) -> Result<Applying, PeriodError> {
    let today = now.to_zoned(time_zone.clone()).date();
    let (day, next) = match budget.period {
        BudgetPeriod::Month => {
            let first = today.first_of_month();
            (first, first.checked_add(1.month())?)
        }
        BudgetPeriod::Day | BudgetPeriod::Rolling30Days => (today, today.checked_add(1.day())?),
    };
    Ok(Applying {
        bucket: slot_key(scope, &id, budget.period, day),
        scope,
        id,
        budget,
        day,
        ends: start_of(next, time_zone)?,
    })
}

impl Applying {
    /// This budget as it applies at `now`: a rolling window moves with the
    /// days; a month's or a day's slot is the one the request was
    /// admitted in.
    pub fn at(&self, time_zone: &TimeZone, now: Timestamp) -> Applying {
        match self.budget.period {
            BudgetPeriod::Rolling30Days => {
                applying(self.scope, Arc::clone(&self.id), self.budget, time_zone, now).unwrap_or_else(|_| self.clone())
            }
            BudgetPeriod::Month | BudgetPeriod::Day => self.clone(),
        }
    }

    /// When what the current slot counts stops counting.
    fn until(&self, time_zone: &TimeZone) -> Option<Timestamp> {
        match self.budget.period {
            BudgetPeriod::Month | BudgetPeriod::Day => Some(self.ends),
            BudgetPeriod::Rolling30Days => {
                let day = self.day.checked_add(ROLLING_DAYS.days()).ok()?;
                start_of(day, time_zone).ok()
            }
        }
    }

    /// Which unit of `self` a spend of `tokens` and `money` exceeds, with
    /// `room` left, as a denial.
    pub fn exhausted(&self, room: Room, counted: Counted, tokens: u64, money: i128) -> Option<Exhausted> {
        let over_money = room.money.is_some_and(|r| money > r);
        let over_tokens = room.tokens.is_some_and(|r| i128::from(tokens) > r);
        if !over_money && !over_tokens {
            return None;
        }
        Some(Exhausted {
            scope: self.scope,
            id: Arc::clone(&self.id),
            period: self.budget.period,
            money: over_money,
            limit: if over_money {
                self.budget.money.map_or(0, Money::picos)
            } else {
                self.budget.tokens.map_or(0, i128::from)
            },
            resets_at: counted.resets_at,
        })
    }
}

impl Counted {
    /// When `a`'s room runs out, at the rate its requests spent since its
    /// window began (each of money and tokens it caps; the sooner).
    pub fn runs_out(&self, a: &Applying, now: Timestamp) -> Option<Timestamp> {
        let elapsed = i128::from(now.as_second() - self.since.as_second()).max(1);
        let out = |cap: Option<i128>, spent: i128| {
            let per_hour = spent.saturating_mul(3_600) / elapsed;
            super::burn::runs_out(now, cap? - spent, per_hour)
        };
        let money = out(a.budget.money.map(Money::picos), self.spent.money);
        let tokens = out(a.budget.tokens.map(i128::from), self.spent.tokens);
        money.into_iter().chain(tokens).min()
    }
}

/// Counts `tokens` and `money` more in `bucket`, budget `a`'s, in the
/// units `a` caps: taken from the permits a leased mirror holds, else
/// added to the slot's count.
fn count(bucket: &mut Bucket, leased: bool, a: &Applying, tokens: i128, money: i128) {
    let tokens = if a.budget.tokens.is_some() { tokens } else { 0 };
    let money = if a.budget.money.is_some() { money } else { 0 };
    if leased {
        bucket.permits.tokens -= tokens;
        bucket.permits.money -= money;
    } else {
        bucket.used.tokens += tokens;
        bucket.used.money += money;
    }
}

impl Buckets {
    /// What `a` has counted in its window (every slot of a rolling one),
    /// and when that starts to fall.
    pub fn counted(&self, a: &Applying, time_zone: &TimeZone) -> Counted {
        let on = |key: &BucketKey| {
            self.map
                .get(key)
                .map_or((Used::default(), Used::default()), |b| (b.used, b.spent))
        };
        let slot_start = start_of(a.day, time_zone).unwrap_or(a.ends);
        if a.budget.period != BudgetPeriod::Rolling30Days {
            let (used, spent) = on(&a.bucket);
            return Counted {
                used,
                spent,
                since: slot_start,
                resets_at: a.ends,
            };
        }
        let (mut used, mut spent) = (Used::default(), Used::default());
        let mut oldest = None;
        for back in (0..ROLLING_DAYS).rev() {
            let Ok(day) = a.day.checked_sub(back.days()) else {
                continue;
            };
            let (u, s) = on(&slot_key(a.scope, &a.id, a.budget.period, day));
            if u != Used::default() || s != Used::default() {
                oldest = oldest.or(Some(day));
                used.add(u);
                spent.add(s);
            }
        }
        let resets_at = oldest
            .and_then(|d| d.checked_add(ROLLING_DAYS.days()).ok())
            .and_then(|d| start_of(d, time_zone).ok())
            .unwrap_or(a.ends);
        let since = oldest.and_then(|d| start_of(d, time_zone).ok()).unwrap_or(slot_start);
        Counted {
            used,
            spent,
            since,
            resets_at,
        }
    }

    /// The room `a` leaves: on a leased mirror what this sidecar holds of
    /// the current slot, elsewhere the cap less what the window counted.
    pub fn room(&self, a: &Applying, time_zone: &TimeZone) -> (Room, Counted) {
        let counted = self.counted(a, time_zone);
        let (tokens, money) = if self.leased {
            let held = self.map.get(&a.bucket).map_or(Permits::default(), |b| b.permits);
            (held.tokens, held.money)
        } else {
            (0, 0)
        };
        let room = Room {
            tokens: a.budget.tokens.map(|cap| {
                if self.leased {
                    tokens
                } else {
                    i128::from(cap) - counted.used.tokens
                }
            }),
            money: a.budget.money.map(|cap| {
                if self.leased {
                    money
                } else {
                    cap.picos() - counted.used.money
                }
            }),
        };
        (room, counted)
    }

    /// The room every budget of `applying` leaves together.
    pub fn room_for(&self, applying: &[Applying], time_zone: &TimeZone) -> Room {
        let mut all = Room::default();
        for a in applying {
            let (room, _) = self.room(a, time_zone);
            all.narrow(room.tokens, room.money);
        }
        all
    }

    /// The first budget of `applying` a spend of `tokens` and `money` does
    /// not fit.
    pub fn exhausted(
        &self,
        applying: &[Applying],
        time_zone: &TimeZone,
        tokens: u64,
        money: i128,
    ) -> Option<Exhausted> {
        applying.iter().find_map(|a| {
            let (room, counted) = self.room(a, time_zone);
            a.exhausted(room, counted, tokens, money)
        })
    }

    /// Counts `tokens` and `money` in every budget of `applying` (checked
    /// by the caller): taken from the permits held on a leased mirror.
    pub fn take_budgets(&mut self, applying: &[Applying], time_zone: &TimeZone, tokens: u64, money: i128) {
        for a in applying {
            let until = a.until(time_zone);
            let bucket = self.map.entry(a.bucket.clone()).or_default();
            count(bucket, self.leased, a, i128::from(tokens), money);
            if !self.leased {
                bucket.until = until;
            }
        }
    }

    /// Corrects what a request counted in the budgets `applying` (as they
    /// applied when it was admitted): by `tokens` and `money` more (less,
    /// when negative), without a check (the spend happened). A slot gone
    /// since counts nothing; on a leased mirror the correction goes to the
    /// permits even if the bucket was let go of meanwhile (its permits
    /// all given back), to be reported.
    pub fn adjust_budgets(&mut self, applying: &[Applying], tokens: i128, money: i128) {
        for a in applying {
            let bucket = if self.leased {
                self.map.entry(a.bucket.clone()).or_default()
            } else {
                let Some(bucket) = self.map.get_mut(&a.bucket) else {
                    continue;
                };
                bucket
            };
            count(bucket, self.leased, a, tokens, money);
        }
    }

    /// Counts what a usage record charged (`tokens`, `money`) as spent in
    /// the budgets `applying` (as they applied at its reserve).
    pub fn spend(&mut self, applying: &[Applying], time_zone: &TimeZone, tokens: u64, money: i128) {
        for a in applying {
            let until = a.until(time_zone);
            let bucket = self.map.entry(a.bucket.clone()).or_default();
            if a.budget.tokens.is_some() {
                bucket.spent.tokens += i128::from(tokens);
            }
            if a.budget.money.is_some() {
                bucket.spent.money += money;
            }
            bucket.until = until;
        }
    }

    /// On a leased mirror, the permits missing to count `tokens` and
    /// `money` in every budget of `applying`.
    pub fn budgets_lacking(&self, applying: &[Applying], tokens: u64, money: i128) -> Lacking {
        if !self.leased {
            return Vec::new();
        }
        applying
            .iter()
            .filter_map(|a| {
                let held = self.map.get(&a.bucket).map_or(Permits::default(), |b| b.permits);
                let lack = Permits {
                    tokens: if a.budget.tokens.is_some() {
                        (i128::from(tokens) - held.tokens).max(0)
                    } else {
                        0
                    },
                    money: if a.budget.money.is_some() {
                        (money - held.money).max(0)
                    } else {
                        0
                    },
                    ..Permits::default()
                };
                (!lack.is_empty()).then(|| (a.bucket.clone(), lack))
            })
            .collect()
    }

    /// Shared side: lends budget `a`'s current slot to a sidecar whose
    /// command lacks `ask` and can go ahead with `least`: nothing unless
    /// the window has room for `least` (an oversized request parks no room
    /// in one sidecar), else `ask` as far as the room goes, and a fair
    /// share (`1/share`) of what is left beside it, for the requests that
    /// follow.
    pub fn lease_budget(
        &mut self,
        a: &Applying,
        time_zone: &TimeZone,
        ask: Permits,
        least: Permits,
        share: i128,
    ) -> Permits {
        let (room, _) = self.room(a, time_zone);
        let give = |room: Option<i128>, ask: i128, least: i128| match room {
            Some(room) if ask > 0 && room >= least.max(0) => {
                let now = ask.min(room).max(0);
                now + (room - now) / share
            }
            _ => 0,
        };
        let lent = Permits {
            tokens: give(room.tokens, ask.tokens, least.tokens),
            money: give(room.money, ask.money, least.money),
            ..Permits::default()
        };
        if !lent.is_empty() {
            let until = a.until(time_zone);
            let bucket = self.map.entry(a.bucket.clone()).or_default();
            bucket.used.tokens += lent.tokens;
            bucket.used.money += lent.money;
            bucket.until = until;
        }
        lent
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    fn key(s: &str) -> ApiKeyId {
        ApiKeyId::parse(s).unwrap()
    }

    fn budgets(period: BudgetPeriod, money: Option<i64>, tokens: Option<u64>) -> Budgets {
        let mut b = Budgets::default();
        b.keys.insert(
            key("k1"),
            Budget {
                period,
                money: money.map(|m| Money::from_picos(i128::from(m) * super::super::money::SCALE)),
                tokens,
            },
        );
        b
    }

    #[test]
    fn slots_follow_the_account_time_zone() {
        let b = budgets(BudgetPeriod::Month, Some(10), None);
        let tz = TimeZone::get("America/New_York").unwrap();
        // 03:00 UTC on the 1st is still November in New York.
        let a = &b.applying(&key("k1"), &tz, at("2026-12-01T03:00:00Z")).unwrap()[0];
        assert_eq!(&*a.bucket.id, "k1#2026-11");
        assert_eq!(a.ends, at("2026-12-01T05:00:00Z"));
        let day = budgets(BudgetPeriod::Day, None, Some(5));
        let a = &day.applying(&key("k1"), &tz, at("2026-12-01T03:00:00Z")).unwrap()[0];
        assert_eq!(&*a.bucket.id, "k1#2026-11-30");
    }

    #[test]
    fn a_rolling_window_counts_thirty_days_and_frees_the_oldest_first() {
        let b = budgets(BudgetPeriod::Rolling30Days, None, Some(100));
        let tz = TimeZone::UTC;
        let mut buckets = Buckets::default();
        let first = b.applying(&key("k1"), &tz, at("2026-11-01T12:00:00Z")).unwrap();
        buckets.take_budgets(&first, &tz, 60, 0);
        let later = b.applying(&key("k1"), &tz, at("2026-11-20T12:00:00Z")).unwrap();
        buckets.take_budgets(&later, &tz, 30, 0);
        let (room, counted) = buckets.room(&later[0], &tz);
        assert_eq!(room.tokens, Some(10));
        assert_eq!(counted.resets_at, at("2026-12-01T00:00:00Z"));
        let e = buckets.exhausted(&later, &tz, 11, 0).unwrap();
        assert!(
            !e.money && e.limit == 100 && e.resets_at == at("2026-12-01T00:00:00Z"),
            "{e:?}"
        );
        // On December 1st the tokens of November 1st no longer count.
        let december = b.applying(&key("k1"), &tz, at("2026-12-01T00:00:00Z")).unwrap();
        assert_eq!(buckets.room(&december[0], &tz).0.tokens, Some(70));
    }

    #[test]
    fn a_key_in_two_projects_and_empty_budgets_are_refused() {
        let mut b = Budgets::default();
        for p in ["p1", "p2"] {
            b.projects.insert(
                ProjectId::parse(p).unwrap(),
                Project {
                    keys: [key("k1")].into(),
                    budget: None,
                },
            );
        }
        assert!(b.check().unwrap_err().contains("in projects p1 and p2"));
        let empty = budgets(BudgetPeriod::Day, None, None);
        assert!(empty.check().unwrap_err().contains("neither money nor tokens"));
        let zero = budgets(BudgetPeriod::Day, Some(0), None);
        assert!(zero.check().is_err());
    }

    #[test]
    fn a_lease_lends_the_need_and_a_fair_share_only_for_the_least_and_the_current_slot() {
        let b = budgets(BudgetPeriod::Day, None, Some(1_000));
        let tz = TimeZone::UTC;
        let now = at("2026-12-07T10:00:00Z");
        let a = b.applying(&key("k1"), &tz, now).unwrap().remove(0);
        let mut shared = Buckets::default();
        let ask = |tokens| Permits {
            tokens,
            ..Permits::default()
        };
        // 100 asked, 1 needed at least: 100, and a quarter of the other 900.
        assert_eq!(shared.lease_budget(&a, &tz, ask(100), ask(1), 4).tokens, 325);
        // 900 asked of the 675 left: all of it.
        assert_eq!(shared.lease_budget(&a, &tz, ask(900), ask(10), 4).tokens, 675);
        let mut other = Buckets::default();
        other.lease_budget(&a, &tz, ask(850), ask(850), 4);
        // 150 left: a least of 151 gets nothing.
        assert_eq!(other.lease_budget(&a, &tz, ask(900), ask(151), 4).tokens, 0);
        assert_eq!(b.of_bucket(&a.bucket, &tz, now), Some(a.clone()));
        assert_eq!(b.of_bucket(&a.bucket, &tz, at("2026-12-08T00:00:00Z")), None);
    }
}
