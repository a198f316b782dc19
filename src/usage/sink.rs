//! The usage sink: one JSON line per usage record, to a file or stdout.
//!
//! Records travel through a bounded queue to one writer task, so the hot
//! path never waits on disk unless the queue is full (explicit
//! back-pressure). The writer flushes whenever the queue runs empty and
//! when every sender is gone, which is how shutdown drains it. Records
//! still queued when the process dies are lost from this sink; with the
//! Redis store the journal and the usage stream are the durable copy.

use std::io;
use std::path::PathBuf;
use std::sync::Arc;

use tokio::io::{AsyncWrite, AsyncWriteExt, BufWriter};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use crate::engine::UsageRecord;
use crate::engine::record::AuditRecord;

/// Where usage records go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UsageSinkConfig {
    /// JSON Lines appended to a file.
    File(PathBuf),
    /// JSON Lines on standard output.
    Stdout,
}

/// What goes to the sink: usage records and audit records, one JSON line
/// each (told apart by `kind`).
#[derive(Debug, Clone, serde::Serialize)]
#[serde(untagged)]
pub enum Emitted {
    /// A usage record.
    Usage(Arc<UsageRecord>),
    /// An operator's change.
    Audit(Arc<AuditRecord>),
    /// A threshold crossed.
    Alert(Arc<crate::engine::alert::AlertRecord>),
}

/// Records queued before senders wait.
pub const QUEUE: usize = 8192;

/// Sends records to the writer task.
pub type UsageSender = mpsc::Sender<Emitted>;

/// The writer task, and the way to stop it.
pub struct Writer {
    close: oneshot::Sender<()>,
    task: JoinHandle<io::Result<()>>,
}

impl Writer {
    /// Stops taking new records, writes every record already queued, flushes
    /// and waits for the task. Senders still alive (calls that outlived the
    /// shutdown grace period) get an error from then on.
    pub async fn finish(self) -> io::Result<()> {
        let _ = self.close.send(());
        self.task.await.map_err(io::Error::other)?
    }
}

/// Opens the sink and starts its writer. The writer ends, flushed, when
/// told to ([`Writer::finish`]) or when every [`UsageSender`] is gone.
pub async fn spawn(config: &UsageSinkConfig) -> io::Result<(UsageSender, Writer)> {
    let out: Box<dyn AsyncWrite + Send + Unpin> = match config {
        UsageSinkConfig::Stdout => Box::new(tokio::io::stdout()),
        UsageSinkConfig::File(path) => {
            let file = tokio::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .await?;
            Box::new(file)
        }
    };
    let (tx, rx) = mpsc::channel(QUEUE);
    let (close, closed) = oneshot::channel();
    let task = tokio::spawn(write(rx, closed, BufWriter::new(out)));
    Ok((tx, Writer { close, task }))
}

async fn write(
    mut rx: mpsc::Receiver<Emitted>,
    mut closed: oneshot::Receiver<()>,
    mut out: BufWriter<Box<dyn AsyncWrite + Send + Unpin>>,
) -> io::Result<()> {
    let mut closing = false;
    loop {
        let record = tokio::select! {
            record = rx.recv() => record,
            _ = &mut closed, if !closing => {
                // Refuse new records; recv() still yields the queued ones.
                rx.close();
                closing = true;
                continue;
            }
        };
        let Some(record) = record else { break };
        let mut line = serde_json::to_vec(&record)?;
        line.push(b'\n');
        out.write_all(&line).await?;
        if rx.is_empty() {
            out.flush().await?;
        }
    }
    out.flush().await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(n: u32) -> Emitted {
        let id = |s: &str| crate::engine::ids::RequestId::parse(s).unwrap();
        Emitted::Usage(Arc::new(UsageRecord {
            kind: crate::engine::record::RecordKind::Charge,
            request_id: id(&format!("r{n}")),
            reservation_id: None,
            account_id: crate::engine::ids::AccountId::parse("a").unwrap(),
            api_key_id: None,
            model: None,
            service_tier: None,
            usage: Default::default(),
            charges: vec![],
            total_money: crate::engine::Money::ZERO,
            price_version: None,
            reserved_at: jiff::Timestamp::UNIX_EPOCH,
            settled_at: jiff::Timestamp::UNIX_EPOCH,
        }))
    }

    #[tokio::test]
    async fn finish_drains_what_is_queued_and_refuses_the_rest_while_senders_live() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("u.jsonl");
        let (tx, writer) = spawn(&UsageSinkConfig::File(path.clone())).await.unwrap();
        for n in 0..100 {
            tx.send(record(n)).await.unwrap();
        }
        // `tx` is still alive (a call that outlived the grace period).
        writer.finish().await.unwrap();
        assert!(tx.send(record(100)).await.is_err());
        assert!(tx.is_closed());
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text.lines().count(), 100);
        assert!(text.lines().last().unwrap().contains("\"request_id\":\"r99\""));
    }
}
