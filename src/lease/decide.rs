//! The steps of one decision on a sidecar.
//!
//! The command runs on the mirror. If the mirror is short, the sidecar
//! syncs (report, give back, borrow exactly the need) and runs it again, a
//! few times at most: the first answer may find the lease lapsed, and
//! requests short at the same moment (a cold start) may take what was lent
//! for one another. Then it decides as the last word from what it holds.
//! When the store cannot be reached, settle, extend and release decide from
//! what the mirror holds (spending already admitted is never refused), and
//! a reserve or charge the lease cannot cover follows the plan's failure
//! policy. Records the mirror makes on the way are journaled before the
//! next step, and before any answer.

use jiff::Timestamp;

use super::{Failure, Local, Numbering};
use crate::engine::catalog::OutagePolicy;
use crate::engine::ids::{ProducerId, RequestId, ReservationId};
use crate::engine::record::RecordKind;
use crate::engine::role::{Journaled, Short};
use crate::engine::{
    Applied, Catalog, ChargeOutcome, ChargeWhat, Command, Denial, EngineError, Reply, ReserveOutcome, UsageRecord,
};

/// How many syncs one decision may ask for before deciding as the last
/// word.
pub const ASKS: usize = 6;

/// What the sidecar's process lends a step: the catalog, the time, who it
/// is and where its records are numbered.
pub struct Context<'a> {
    /// The catalog in force.
    pub catalog: &'a Catalog,
    /// The decision's instant.
    pub now: Timestamp,
    /// This process (on its lease reports and journal entries).
    pub producer: &'a ProducerId,
    /// The journal numbering its records, if it has one.
    pub journal: Option<&'a mut dyn Numbering>,
}

/// What the driver does next.
#[derive(Debug)]
pub enum Next {
    /// Make these entries durable, then call [`Decide::journaled`].
    Journal(Vec<Journaled>),
    /// Sync with this shortfall (after the pending sync, if any), then call
    /// [`Decide::synced`].
    Sync(Short),
    /// Ask the store what it knows of this request id ([`Known`]), then
    /// call [`Decide::recorded`].
    Recorded(RequestId),
    /// The answer ([`Decide::outage`] says whether a failure policy made
    /// it).
    Done(Result<Applied, Failure>),
}

/// How a sync the decision asked for went.
#[derive(Debug)]
pub enum SyncOutcome {
    /// Applied: the mirror holds what was lent.
    Done,
    /// The store is reachable, but other writers kept winning.
    Busy,
    /// The store could not be reached, or its answer was lost: why.
    Unreachable(String),
}

/// What the store knows of a request id.
#[derive(Debug)]
pub enum Known {
    /// No record of it was committed within the idempotency window.
    Nothing,
    /// A record of it was committed; where it went is no longer kept.
    Recorded,
    /// The record committed for it: the first call's answer, when the
    /// call is the same.
    Answer(Box<UsageRecord>),
}

/// One decision, between its I/O steps.
#[derive(Debug)]
pub struct Decide {
    command: Command,
    /// Sent again by its client after an unknown outcome, perhaps first
    /// to another sidecar: a reserve or charge this mirror does not
    /// remember asks the store first.
    resent: bool,
    /// The store was asked before the command ran (a resend).
    asked_first: bool,
    /// A resend the store knew nothing of: what it charges is committed
    /// before the answer, so the answer is the one billed.
    commit_first: bool,
    /// Its answer, waiting for that commit.
    decided: Option<Applied>,
    /// That commit found the request recorded already: the store is asked
    /// once more, and then the answer is final.
    after_commit: bool,
    asks: usize,
    /// The failure policy consulted, when the store was unreachable.
    outage: Option<OutagePolicy>,
    /// What follows the journal write in flight.
    then: Option<Then>,
    /// A denial for what the shared account lent, held back while the
    /// store says whether the request was charged already elsewhere.
    denied: Option<Applied>,
}

/// What follows a journal write.
#[derive(Debug)]
enum Then {
    Sync(Short),
    Recorded(RequestId),
    Answer(Result<Applied, Failure>),
}

impl Decide {
    /// A decision of `command`.
    pub fn new(command: Command) -> Decide {
        Decide {
            command,
            resent: false,
            asked_first: false,
            commit_first: false,
            decided: None,
            after_commit: false,
            asks: 0,
            outage: None,
            then: None,
            denied: None,
        }
    }

    /// A decision of `command`, sent again by its client after an unknown
    /// outcome: answered as the first call was wherever that was decided,
    /// once its record is in the store.
    pub fn resent(command: Command) -> Decide {
        Decide {
            resent: true,
            ..Decide::new(command)
        }
    }

    /// The failure policy that decided, if the store was unreachable.
    pub fn outage(&self) -> Option<OutagePolicy> {
        self.outage
    }

    /// The first step: the command on the mirror. For a resend that this
    /// mirror did not answer (a reserve or charge it does not remember, a
    /// settle of a hold still open here: the reserve was resent here too),
    /// what the store knows of it first: another sidecar, or this one
    /// before a restart, may have decided it. The same for any call on a
    /// request this mirror decided again and the store found recorded: its
    /// answer is the first call's, not the one this mirror keeps.
    pub fn start(&mut self, local: &mut Local, cx: Context<'_>) -> Next {
        // Plain calls on a mirror with nothing superseded skip all of it.
        if (self.resent || local.has_superseded())
            && let Some(request) = request_named(&self.command)
        {
            let mirror = local.mirror();
            let unanswered_here = match &self.command {
                Command::Reserve(_) | Command::Charge(_) => !mirror.remembers(&request),
                Command::Settle { reservation, .. } => mirror.holds_open(reservation),
                _ => false,
            };
            // Answered here, its record not committed yet: the first call's
            // may land first, so it is looked up, then committed.
            let unsure = self.resent && local.uncommitted(&request);
            if (self.resent && unanswered_here) || unsure || local.superseded(&request, cx.now) {
                self.asked_first = true;
                return Next::Recorded(request);
            }
        }
        self.run(local, cx, None, None)
    }

    /// The sync asked for went as `outcome`.
    pub fn synced(&mut self, local: &mut Local, cx: Context<'_>, outcome: SyncOutcome) -> Next {
        if let Some(decided) = self.decided.take() {
            return self.committed(local, cx, decided, outcome);
        }
        match outcome {
            SyncOutcome::Done if self.asks < ASKS => self.run(local, cx, None, None),
            // Asked enough: decide from what is held.
            SyncOutcome::Done => self.run(local, cx, Some(0), None),
            // Reachable but contended (many sidecars short at once near
            // zero): not an outage; decide from what is held, but the
            // shared account was not read, so short of funds here is not
            // the account's balance: retryable.
            SyncOutcome::Busy => {
                let why = format!(
                    "the store is too contended to lend now, and what this sidecar holds of account {} cannot \
                     cover the request",
                    local.mirror().id
                );
                self.run(local, cx, Some(0), Some(why))
            }
            SyncOutcome::Unreachable(why) => {
                if !matches!(self.command, Command::Reserve(_) | Command::Charge(_)) {
                    return self.run(local, cx, Some(0), None);
                }
                let policy = cx
                    .catalog
                    .plans
                    .get(&local.mirror().plan)
                    .map(|p| p.on_store_outage)
                    .unwrap_or_default();
                self.outage = Some(policy);
                match local.outage_overdraft(policy) {
                    None => Next::Done(Err(Failure::Unavailable(format!(
                        "{why}; this sidecar's lease cannot cover the request and the plan fails closed"
                    )))),
                    Some(overdraft) => {
                        let why = format!(
                            "{why}; what this sidecar holds of account {} (its lease and the plan's outage \
                             allowance) cannot cover the request",
                            local.mirror().id
                        );
                        self.run(local, cx, Some(overdraft), Some(why))
                    }
                }
            }
        }
    }

    /// The commit of a resent charge or settle decided here went as
    /// `outcome`: its record was applied (the answer is the one billed), or
    /// found recorded by another sidecar meanwhile (the answer is that
    /// one's, asked once more); not committed (the store unreachable, or
    /// the record waiting behind another on its way to the journal), the
    /// caller retries.
    fn committed(&mut self, local: &mut Local, cx: Context<'_>, decided: Applied, outcome: SyncOutcome) -> Next {
        let Some(request) = request_named(&self.command) else {
            return Next::Done(Ok(decided));
        };
        let unsure = |local: &mut Local, decided: Applied| {
            local.untold(decided.records);
            Next::Done(Err(Failure::Unavailable(
                "a resend decided here could not be committed to tell whether its answer is the one billed; retry"
                    .into(),
            )))
        };
        match outcome {
            SyncOutcome::Done if local.superseded(&request, cx.now) => {
                local.untold(decided.records);
                self.asked_first = true;
                self.after_commit = true;
                Next::Recorded(request)
            }
            SyncOutcome::Done if local.uncommitted(&request) => unsure(local, decided),
            SyncOutcome::Done => Next::Done(Ok(decided)),
            SyncOutcome::Busy | SyncOutcome::Unreachable(_) => unsure(local, decided),
        }
    }

    /// Hands back what the decision holds for the caller, when it ends
    /// without reaching [`Next::Done`] (the driver failed): the records go
    /// with the next command's.
    pub fn abandon(&mut self, local: &mut Local) {
        if let Some(decided) = self.decided.take() {
            local.untold(decided.records);
        }
        if let Some(denied) = self.denied.take() {
            local.untold(denied.records);
        }
    }

    /// The journal write asked for went as `written` (`entries` are kept
    /// in memory either way, for the next sync).
    pub fn journaled(&mut self, local: &mut Local, entries: Vec<Journaled>, written: Result<(), String>) -> Next {
        local.appended(entries);
        let then = self.then.take();
        if let Err(e) = written {
            if let Some(decided) = self.decided.take() {
                local.untold(decided.records);
            }
            return Next::Done(Err(Failure::Unavailable(e)));
        }
        match then {
            Some(then) => then.next(),
            None => Next::Done(Err(Failure::Unavailable(
                "a journal write answered that nothing asked for".into(),
            ))),
        }
    }

    /// Runs the command on the mirror (as the last word with `last_word`),
    /// without the shared account's balance if `unread` says why (then a
    /// denial for funds is UNAVAILABLE, with that reason); then journals
    /// what it made, and syncs or answers.
    fn run(&mut self, local: &mut Local, cx: Context<'_>, last_word: Option<i128>, unread: Option<String>) -> Next {
        let (result, records) = local.run(cx.catalog, &self.command, cx.now, last_word);
        // Looked up before `entries` takes what waits for numbers.
        let journaled = match (&result, &self.command) {
            (Err(EngineError::NotFound(_)), Command::Settle { reservation, .. } | Command::Release(reservation)) => {
                local.journaled_record(reservation).cloned()
            }
            _ => None,
        };
        let entries = match local.entries(&records, cx.journal, cx.producer) {
            Ok(entries) => entries,
            // The disk refuses even the number reservation: the charges
            // stay in the mirror's log and reach the store with the next
            // report. The caller is told.
            Err(e) => return Next::Done(Err(Failure::Unavailable(e))),
        };
        let then = match result {
            Ok(reply) => match (unread, denial(&reply), request_of(&self.command)) {
                // Short of funds or permits here is not the account's
                // state, which could not be read now (an outage, or
                // contention).
                (Some(why), Some(Denial::InsufficientFunds | Denial::RateLimited(_)), _) => {
                    local.untold(records);
                    Then::Answer(Err(Failure::Unavailable(why)))
                }
                // Denied for funds on what the shared account had: a retry
                // of a request another sidecar (or this one before a
                // restart) charged must be told so, not denied. One store
                // call, on this path only (not for rate limits: a flood of
                // denied calls would pay it on each).
                (None, Some(Denial::InsufficientFunds), Some(request)) if last_word.is_some() => {
                    let request = request.clone();
                    self.denied = Some(Applied {
                        reply,
                        records: local.told(records),
                    });
                    Then::Recorded(request)
                }
                // A resend nobody had recorded: committed before it is
                // answered (see `committed`).
                _ if std::mem::take(&mut self.commit_first)
                    && matches!(reply, Reply::Charge(ChargeOutcome::Charged(_)) | Reply::Settle(_)) =>
                {
                    self.decided = Some(Applied {
                        reply,
                        records: local.told(records),
                    });
                    Then::Sync(Short {
                        least: Vec::new(),
                        need: None,
                        permits: Vec::new(),
                    })
                }
                _ => Then::Answer(Ok(Applied {
                    reply,
                    records: local.told(records),
                })),
            },
            Err(EngineError::Short(short)) if last_word.is_none() => {
                self.asks += 1;
                local.untold(records);
                Then::Sync(*short)
            }
            Err(EngineError::NotFound(what)) => {
                local.untold(records);
                self.unknown_reservation(journaled, what)
            }
            Err(e) => {
                local.untold(records);
                Then::Answer(Err(Failure::Engine(e)))
            }
        };
        if entries.is_empty() {
            return then.next();
        }
        self.then = Some(then);
        Next::Journal(entries)
    }

    /// A settle or release of a reservation this mirror does not know: it
    /// may have been closed here before a restart. Its record, journaled
    /// and not yet applied, answers as the first call did; else the store
    /// is asked whether its record was committed. Anything else is not
    /// found.
    fn unknown_reservation(&self, journaled: Option<UsageRecord>, what: String) -> Then {
        let (reservation, usage) = match &self.command {
            Command::Settle { reservation, usage } => (reservation, Some(usage)),
            Command::Release(reservation) => (reservation, None),
            _ => return Then::Answer(Err(Failure::Engine(EngineError::NotFound(what)))),
        };
        match journaled {
            Some(record) if record.kind == RecordKind::Settle && Some(&record.usage) == usage => {
                Then::Answer(Ok(Applied {
                    reply: Reply::Settle(std::sync::Arc::new(record)),
                    records: Vec::new(),
                }))
            }
            Some(_) => Then::Answer(Err(Failure::Engine(closed(reservation)))),
            None => Then::Recorded(reservation.request_id()),
        }
    }

    /// The store said what it knows of the request the command names
    /// (`Err`: it could not be asked): asked first for a resend, for a
    /// denied reserve or charge, or for a settle or release of a
    /// reservation the mirror does not hold.
    pub fn recorded(&mut self, local: &mut Local, cx: Context<'_>, known: Result<Known, String>) -> Next {
        if let Some(denied) = self.denied.take() {
            return Next::Done(match known {
                // Charged already, elsewhere or before a restart: the first
                // answer if this is the same call, else that it was.
                Ok(Known::Answer(record)) => {
                    local.untold(denied.records);
                    self.answered_by(&record).ok_or_else(|| self.charged_already())
                }
                Ok(Known::Recorded) => {
                    local.untold(denied.records);
                    Err(self.charged_already())
                }
                // Not recorded, or the store cannot say: the denial stands.
                Ok(Known::Nothing) | Err(_) => Ok(denied),
            });
        }
        if std::mem::take(&mut self.asked_first) {
            return match known {
                Ok(Known::Answer(record)) => {
                    Next::Done(self.answered_by(&record).ok_or_else(|| self.charged_already()))
                }
                Ok(Known::Recorded) => Next::Done(Err(self.charged_already())),
                // The commit found it recorded (where its record went may
                // be in a bucket not looked in): it was charged.
                Ok(Known::Nothing) if self.after_commit => Next::Done(Err(self.charged_already())),
                Ok(Known::Nothing) => {
                    self.commit_first = self.resent;
                    self.run(local, cx, None, None)
                }
                // Whether it was decided elsewhere cannot be known now.
                Err(why) => Next::Done(Err(Failure::Unavailable(why))),
            };
        }
        let (reservation, settle) = match &self.command {
            Command::Settle { reservation, .. } => (reservation, true),
            Command::Release(reservation) => (reservation, false),
            _ => {
                return Next::Done(Err(Failure::Unavailable(
                    "nothing asked whether it was recorded".into(),
                )));
            }
        };
        Next::Done(match known {
            Ok(Known::Answer(record)) => self
                .answered_by(&record)
                .ok_or_else(|| Failure::Engine(closed(reservation))),
            Ok(Known::Recorded) => Err(Failure::Engine(closed(reservation))),
            // A settle resent here may have been applied by the sidecar
            // holding the reservation, its record not in the store yet.
            Ok(Known::Nothing) if settle && self.resent => Err(Failure::Unavailable(format!(
                "reservation {reservation} is not held by this sidecar and no record of it has reached the store: \
                 if it was settled on another sidecar, its record arrives there within a report interval; a \
                 reservation is settled on the sidecar that holds it"
            ))),
            Ok(Known::Nothing) => Err(Failure::Engine(EngineError::NotFound(format!(
                "reservation {reservation}"
            )))),
            // Whether it was settled cannot be known now: retry.
            Err(why) => Err(Failure::Unavailable(why)),
        })
    }

    /// The answer `record` gives the command, if it is the record the same
    /// call made: a charge of the same usage or amount, or a settle of the
    /// same reservation with the same usage.
    fn answered_by(&self, record: &UsageRecord) -> Option<Applied> {
        let reply = match &self.command {
            Command::Charge(req)
                if record.kind == RecordKind::Charge
                    && record.request_id == req.request_id
                    && record.api_key_id == req.api_key_id
                    && record.model == req.model
                    && match &req.what {
                        ChargeWhat::Usage(usage) => {
                            record.usage == *usage && record.service_tier.as_ref() == Some(&req.tier)
                        }
                        ChargeWhat::Money(amount) => record.total_money == *amount,
                    } =>
            {
                Reply::Charge(ChargeOutcome::Charged(std::sync::Arc::new(record.clone())))
            }
            Command::Settle { reservation, usage }
                if record.kind == RecordKind::Settle
                    && record.reservation_id.as_ref() == Some(reservation)
                    && record.usage == *usage =>
            {
                Reply::Settle(std::sync::Arc::new(record.clone()))
            }
            _ => return None,
        };
        Some(Applied {
            reply,
            records: Vec::new(),
        })
    }

    /// A call whose request id has a record whose answer this call cannot
    /// have.
    fn charged_already(&self) -> Failure {
        if let Command::Settle { reservation, .. } | Command::Release(reservation) = &self.command {
            return Failure::Engine(closed(reservation));
        }
        let request = request_of(&self.command).map_or_else(String::new, ToString::to_string);
        Failure::Engine(EngineError::Precondition(format!(
            "request {request} was settled or charged already (decided by another sidecar, or before a restart); \
             its usage record is in the usage stream"
        )))
    }
}

impl Then {
    fn next(self) -> Next {
        match self {
            Then::Sync(short) => Next::Sync(short),
            Then::Recorded(request) => Next::Recorded(request),
            Then::Answer(answer) => Next::Done(answer),
        }
    }
}

/// A reservation closed by this sidecar before it restarted, or by another
/// one: its record exists, its answer is no longer here.
fn closed(reservation: &ReservationId) -> EngineError {
    EngineError::Precondition(format!(
        "reservation {reservation} was settled or charged already; its usage record is in the usage stream"
    ))
}

/// The request a client's command names (a reservation's is its
/// reserve's).
fn request_named(command: &Command) -> Option<RequestId> {
    match command {
        Command::Reserve(req) => Some(req.request_id.clone()),
        Command::Charge(req) => Some(req.request_id.clone()),
        Command::Settle { reservation, .. } | Command::Release(reservation) => Some(reservation.request_id()),
        _ => None,
    }
}

/// The request a reserve or charge names (the commands that are denied).
fn request_of(command: &Command) -> Option<&RequestId> {
    match command {
        Command::Reserve(req) => Some(&req.request_id),
        Command::Charge(req) => Some(&req.request_id),
        _ => None,
    }
}

/// Why `reply` denied, if it is a denial.
fn denial(reply: &Reply) -> Option<&Denial> {
    match reply {
        Reply::Reserve(ReserveOutcome::Denied { denial, .. }) | Reply::Charge(ChargeOutcome::Denied(denial, _)) => {
            Some(denial)
        }
        _ => None,
    }
}
