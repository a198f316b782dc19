//! Guards on TCP connections, against clients that hold sockets without
//! using them: at most `max` open at once (a connection beyond is closed as
//! soon as it is accepted, so the ones being served keep their share), and
//! a deadline for a new connection's opening bytes (a socket that never
//! sends its HTTP/2 preface, or sends it a byte at a time, is closed
//! instead of holding a place; HTTP/2 keepalive takes over after).

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Sleep;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::{Connected, TcpConnectInfo};

/// How connections are guarded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Guard {
    /// Open connections at most.
    pub max: usize,
    /// A new connection's opening bytes (the 24 of the HTTP/2 preface, or
    /// as many of a TLS hello) must all arrive within this.
    pub first_bytes: Duration,
}

impl Default for Guard {
    /// 10,000 connections; 10 s for the first bytes.
    fn default() -> Self {
        Guard {
            max: 10_000,
            first_bytes: Duration::from_secs(10),
        }
    }
}

/// A connection counted against [`Guard::max`] while it is open.
pub struct Guarded {
    stream: TcpStream,
    _permit: OwnedSemaphorePermit,
    /// Until the opening bytes are read.
    deadline: Option<Pin<Box<Sleep>>>,
    /// Bytes read so far, up to [`OPENING`].
    read: usize,
}

/// The length of the HTTP/2 client preface: one byte is not a client
/// speaking, but a client keeping a connection open.
const OPENING: usize = 24;

/// Accepts from `listener` under `guard`, until the returned stream is
/// dropped. Nagle's algorithm is off: a decision is a few hundred bytes
/// each way, and waiting to coalesce them (against the peer's delayed ACK)
/// would add milliseconds to every call.
pub fn incoming(listener: TcpListener, guard: Guard) -> ReceiverStream<io::Result<Guarded>> {
    let open = Arc::new(Semaphore::new(guard.max));
    let (tx, rx) = mpsc::channel(16);
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                () = tx.closed() => return,
                accepted = listener.accept() => accepted,
            };
            let (stream, peer) = match accepted {
                Ok(accepted) => accepted,
                // Out of descriptors and the like: wait, then go on; the
                // listener must outlive a bad moment.
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let Ok(permit) = Arc::clone(&open).try_acquire_owned() else {
                crate::metrics::metrics().connections_refused.inc();
                tracing::debug!(%peer, max = guard.max, "connection refused: too many open");
                continue;
            };
            let _ = stream.set_nodelay(true);
            let guarded = Guarded {
                stream,
                _permit: permit,
                deadline: Some(Box::pin(tokio::time::sleep(guard.first_bytes))),
                read: 0,
            };
            if tx.send(Ok(guarded)).await.is_err() {
                return;
            }
        }
    });
    ReceiverStream::new(rx)
}

impl Connected for Guarded {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.stream.connect_info()
    }
}

impl AsyncRead for Guarded {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let read = Pin::new(&mut this.stream).poll_read(cx, buf);
        let Some(deadline) = this.deadline.as_mut() else {
            return read;
        };
        if let Poll::Ready(Ok(())) = &read {
            this.read += buf.filled().len() - before;
            if this.read >= OPENING {
                this.deadline = None;
                return read;
            }
        }
        // Polled whatever the read did, so the timer is armed while the
        // client is silent and fires even if it trickles.
        if matches!(read, Poll::Pending | Poll::Ready(Ok(()))) && deadline.as_mut().poll(cx).is_ready() {
            crate::metrics::metrics().connections_refused.inc();
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the client's opening bytes did not arrive in time",
            )));
        }
        read
    }
}

impl AsyncWrite for Guarded {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}
