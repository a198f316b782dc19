//! The billing side's reports as tables, for a person to read: a
//! statement and a re-pricing (`tollgate usage statement`, `reprice`);
//! `--json` and `--csv` print the same figures for programs.

use std::io::Write;

use super::admin::table;
use crate::billing::reprice::{Mover, Repricing};
use crate::billing::statement::Statement;

/// A re-pricing as tables.
pub(super) fn print_repricing(out: &mut impl Write, r: &Repricing, top: usize) -> std::io::Result<()> {
    writeln!(
        out,
        "Usage settled from {} to {}, priced again at draft {}",
        r.from, r.to, r.version
    )?;
    writeln!(out)?;
    let movers = |rows: &[Mover], with_account: bool| {
        let mut header = vec!["model", "tier", "records", "charged", "draft", "change"];
        if with_account {
            header.insert(0, "account");
        }
        let mut t = table(&header);
        for m in rows {
            let mut row = vec![
                m.model.clone(),
                m.service_tier.clone(),
                m.records.to_string(),
                m.charged.to_string(),
                m.repriced.to_string(),
                m.delta.to_string(),
            ];
            if with_account {
                row.insert(0, m.account_id.clone());
            }
            t.add_row(row);
        }
        t
    };
    writeln!(out, "{}", movers(&r.models, false))?;
    writeln!(out)?;
    let shown = r.accounts.len().min(top);
    writeln!(out, "{}", movers(&r.accounts[..shown], true))?;
    if shown < r.accounts.len() {
        writeln!(out, "... and {} more (--top, --json, --csv)", r.accounts.len() - shown)?;
    }
    if !r.unpriced.is_empty() {
        writeln!(out)?;
        writeln!(out, "Not priced by the draft (left out of the figures):")?;
        writeln!(out, "{}", movers(&r.unpriced, false))?;
    }
    writeln!(out)?;
    let mut total = table(&["", "money"]);
    for (name, amount) in [("charged", r.charged), ("draft", r.repriced), ("change", r.delta)] {
        total.add_row(vec![name.to_owned(), amount.to_string()]);
    }
    writeln!(out, "{total}")
}

/// A statement as tables.
pub(super) fn print_statement(out: &mut impl Write, st: &Statement) -> std::io::Result<()> {
    writeln!(
        out,
        "Statement of {} for {} ({} to {})",
        st.account_id, st.month, st.from, st.to
    )?;
    writeln!(out)?;
    let split = st.usage.iter().any(|u| u.money_by_kind.is_some());
    let mut header = vec![
        "model",
        "tier",
        "records",
        "input",
        "cached input",
        "cache write",
        "output",
    ];
    if split {
        header.extend(["input $", "cached input $", "cache write $", "output $"]);
    }
    header.push("charged");
    let mut usage = table(&header);
    for u in &st.usage {
        let mut row = vec![
            u.model.clone(),
            u.service_tier.clone(),
            u.records.to_string(),
            u.input_tokens.to_string(),
            u.cached_input_tokens.to_string(),
            u.cache_write_tokens.to_string(),
            u.output_tokens.to_string(),
        ];
        if split {
            let k = u.money_by_kind.unwrap_or_default();
            row.extend([k.input, k.cached_input, k.cache_write, k.output].map(|m| m.to_string()));
        }
        row.push(u.money.to_string());
        usage.add_row(row);
    }
    writeln!(out, "{usage}")?;
    writeln!(out)?;
    let mut sources = table(&["source", "lot", "tokens", "money"]);
    for s in &st.sources {
        sources.add_row(vec![
            s.source.clone(),
            s.lot.clone(),
            s.tokens.map(|t| t.to_string()).unwrap_or_default(),
            s.money.map(|m| m.to_string()).unwrap_or_default(),
        ]);
    }
    writeln!(out, "{sources}")?;
    writeln!(out)?;
    let mut changes = table(&["at", "operation", "adjustment", "operator", "reason", "money"]);
    for c in &st.changes {
        changes.add_row(vec![
            c.at.to_string(),
            c.operation.clone(),
            c.adjustment_id.clone(),
            c.operator.clone(),
            c.reason.clone(),
            c.money.to_string(),
        ]);
    }
    writeln!(out, "{changes}")?;
    writeln!(out)?;
    let mut balances = table(&["balance", "money"]);
    for (name, amount) in [
        ("opening", st.opening),
        ("+ changes", st.changes_total),
        ("- charges", st.charges_total),
        ("closing", st.closing),
    ] {
        balances.add_row(vec![name.to_owned(), amount.to_string()]);
    }
    writeln!(out, "{balances}")?;
    for warning in &st.warnings {
        writeln!(out, "\nNote: {warning}.")?;
    }
    Ok(())
}
