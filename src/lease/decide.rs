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
use crate::engine::lease::{Journaled, Short};
use crate::engine::record::RecordKind;
use crate::engine::{
    Applied, Catalog, ChargeOutcome, Command, Denial, EngineError, Reply, ReserveOutcome, UsageRecord,
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
    /// Ask the store whether a record of this request id was committed
    /// within the idempotency window, then call [`Decide::recorded`].
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

/// One decision, between its I/O steps.
#[derive(Debug)]
pub struct Decide {
    command: Command,
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
            asks: 0,
            outage: None,
            then: None,
            denied: None,
        }
    }

    /// The failure policy that decided, if the store was unreachable.
    pub fn outage(&self) -> Option<OutagePolicy> {
        self.outage
    }

    /// The first step: the command on the mirror.
    pub fn start(&mut self, local: &mut Local, cx: Context<'_>) -> Next {
        self.run(local, cx, None, None)
    }

    /// The sync asked for went as `outcome`.
    pub fn synced(&mut self, local: &mut Local, cx: Context<'_>, outcome: SyncOutcome) -> Next {
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

    /// The journal write asked for went as `written` (`entries` are kept
    /// in memory either way, for the next sync).
    pub fn journaled(&mut self, local: &mut Local, entries: Vec<Journaled>, written: Result<(), String>) -> Next {
        local.appended(entries);
        let then = self.then.take();
        if let Err(e) = written {
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

    /// The store said whether the request the command closes (or a denied
    /// reserve or charge names) was recorded (`Err`: it could not be
    /// asked).
    pub fn recorded(&mut self, local: &mut Local, recorded: Result<bool, String>) -> Next {
        if let Some(denied) = self.denied.take() {
            return Next::Done(match (recorded, request_of(&self.command)) {
                (Ok(true), Some(request)) => {
                    local.untold(denied.records);
                    Err(Failure::Engine(EngineError::Precondition(format!(
                        "request {request} was settled or charged already (decided by another sidecar, or before \
                         a restart); its usage record is in the usage stream"
                    ))))
                }
                // Not recorded, or the store cannot say: the denial stands.
                _ => Ok(denied),
            });
        }
        let reservation = match &self.command {
            Command::Settle { reservation, .. } | Command::Release(reservation) => reservation,
            _ => {
                return Next::Done(Err(Failure::Unavailable(
                    "nothing asked whether it was recorded".into(),
                )));
            }
        };
        Next::Done(match recorded {
            Ok(true) => Err(Failure::Engine(closed(reservation))),
            Ok(false) => Err(Failure::Engine(EngineError::NotFound(format!(
                "reservation {reservation}"
            )))),
            // Whether it was settled cannot be known now: retry.
            Err(why) => Err(Failure::Unavailable(why)),
        })
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
