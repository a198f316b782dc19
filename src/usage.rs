//! The usage sink: one JSON line per usage record, to a file or stdout.
//!
//! Records travel through a bounded queue to one writer task, so the hot
//! path never waits on disk unless the queue is full (explicit
//! back-pressure). The writer flushes whenever the queue runs empty and
//! when every sender is gone, which is how shutdown drains it. Records
//! still queued when the process dies are lost; the durable journal is the
//! fix (a later stage of the design).

use std::io;

use tokio::io::{AsyncWrite, AsyncWriteExt, BufWriter};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::config::UsageSinkConfig;
use crate::engine::UsageRecord;

/// Records queued before senders wait.
pub const QUEUE: usize = 8192;

/// Sends records to the writer task.
pub type UsageSender = mpsc::Sender<UsageRecord>;

/// Opens the sink and starts its writer. The task ends, flushed, when every
/// [`UsageSender`] has been dropped.
pub async fn spawn(config: &UsageSinkConfig) -> io::Result<(UsageSender, JoinHandle<io::Result<()>>)> {
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
    Ok((tx, tokio::spawn(write(rx, BufWriter::new(out)))))
}

async fn write(
    mut rx: mpsc::Receiver<UsageRecord>,
    mut out: BufWriter<Box<dyn AsyncWrite + Send + Unpin>>,
) -> io::Result<()> {
    while let Some(record) = rx.recv().await {
        let mut line = serde_json::to_vec(&record)?;
        line.push(b'\n');
        out.write_all(&line).await?;
        if rx.is_empty() {
            out.flush().await?;
        }
    }
    out.flush().await
}
