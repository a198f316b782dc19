//! Guards on connections (TCP and Unix sockets alike), against clients that hold sockets without
//! using them: at most `max` open at once on one plane, whichever of its
//! listeners they came through (a connection beyond is closed as soon as
//! it is accepted, so the ones being served keep their share), and
//! a deadline for a new connection's opening bytes (a socket that never
//! sends its HTTP/2 preface, or sends it a byte at a time, is closed
//! instead of holding a place; HTTP/2 keepalive takes over after).

use std::convert::Infallible;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio::sync::mpsc;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Sleep;
use tokio_stream::wrappers::ReceiverStream;
use tonic::body::Body;
use tonic::codegen::BoxFuture;
use tonic::server::NamedService;
use tonic::transport::server::Connected;

/// How connections are guarded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Guard {
    /// Open connections at most.
    pub max: usize,
    /// A new connection's opening bytes (the 24 of the HTTP/2 preface, or
    /// as many of a TLS hello) must all arrive within this.
    pub first_bytes: Duration,
    /// A call's request must arrive whole and be answered within this
    /// ([`Deadline`]): a stream whose body stops half-way gives back its
    /// place and its buffer then.
    pub call: Duration,
}

impl Default for Guard {
    /// 10,000 connections; 10 s for the first bytes, 30 s for a call.
    fn default() -> Self {
        Guard {
            max: 10_000,
            first_bytes: Duration::from_secs(10),
            call: Duration::from_secs(30),
        }
    }
}

impl Guard {
    /// One budget of [`Guard::max`] places, for every listener of one plane
    /// (its TCP port and its Unix socket share it).
    pub fn places(self) -> Places {
        Places {
            guard: self,
            open: Arc::new(Semaphore::new(self.max)),
        }
    }
}

/// The places of one plane: a [`Guard`] and the connections open under it,
/// shared by the plane's listeners.
#[derive(Debug, Clone)]
pub struct Places {
    guard: Guard,
    open: Arc<Semaphore>,
}

/// A connection counted against [`Guard::max`] while it is open.
pub struct Guarded<S = TcpStream> {
    stream: S,
    _permit: OwnedSemaphorePermit,
    /// Until the opening bytes are read.
    deadline: Option<Pin<Box<Sleep>>>,
    /// Bytes read so far, up to [`OPENING`].
    read: usize,
}

/// The length of the HTTP/2 client preface: one byte is not a client
/// speaking, but a client keeping a connection open.
const OPENING: usize = 24;

/// A listener [`incoming`] accepts from.
pub trait Listener: Send + 'static {
    /// Its connections.
    type Stream: Send + 'static;

    /// The next connection, and who is on the other end (for logs).
    fn next(&self) -> impl Future<Output = io::Result<(Self::Stream, String)>> + Send;
}

impl Listener for TcpListener {
    type Stream = TcpStream;

    /// Nagle's algorithm is off: a decision is a few hundred bytes each
    /// way, and waiting to coalesce them (against the peer's delayed ACK)
    /// would add milliseconds to every call.
    async fn next(&self) -> io::Result<(TcpStream, String)> {
        let (stream, peer) = self.accept().await?;
        let _ = stream.set_nodelay(true);
        Ok((stream, peer.to_string()))
    }
}

impl Listener for UnixListener {
    type Stream = UnixStream;

    async fn next(&self) -> io::Result<(UnixStream, String)> {
        let (stream, _) = self.accept().await?;
        Ok((stream, "a unix socket client".to_owned()))
    }
}

/// Accepts from `listener` into `places`, until the returned stream is
/// dropped.
pub fn incoming<L: Listener>(listener: L, places: Places) -> ReceiverStream<io::Result<Guarded<L::Stream>>> {
    let Places { guard, open } = places;
    let (tx, rx) = mpsc::channel(16);
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                () = tx.closed() => return,
                accepted = listener.next() => accepted,
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
                crate::telemetry::metrics::metrics().connections_refused.inc();
                tracing::debug!(%peer, max = guard.max, "connection refused: too many open");
                continue;
            };
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

impl<S: Connected> Connected for Guarded<S> {
    type ConnectInfo = S::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.stream.connect_info()
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Guarded<S> {
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
            crate::telemetry::metrics::metrics().connections_refused.inc();
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the client's opening bytes did not arrive in time",
            )));
        }
        read
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Guarded<S> {
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

/// A gRPC service whose calls end with DEADLINE_EXCEEDED after a fixed
/// time: the request is read inside the call, so a client that sends half
/// a message and stalls holds its stream and buffer only that long. A
/// streamed answer (health `Watch`) is bounded only until its headers:
/// its body streams on.
#[derive(Debug, Clone)]
pub struct Deadline<S> {
    inner: S,
    after: Duration,
}

impl<S> Deadline<S> {
    /// `inner`, each call ended after `after`.
    pub fn new(inner: S, after: Duration) -> Deadline<S> {
        Deadline { inner, after }
    }
}

impl<S: NamedService> NamedService for Deadline<S> {
    const NAME: &'static str = S::NAME;
}

impl<S> tower::Service<http::Request<Body>> for Deadline<S>
where
    S: tower::Service<http::Request<Body>, Response = http::Response<Body>, Error = Infallible> + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Infallible>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        let (call, after) = (self.inner.call(request), self.after);
        Box::pin(async move {
            match tokio::time::timeout(after, call).await {
                Ok(answered) => answered,
                Err(_) => {
                    crate::telemetry::metrics::metrics().calls_timed_out.inc();
                    Ok(tonic::Status::deadline_exceeded(format!(
                        "the call was not received and answered within {} ms (server.call_timeout_ms)",
                        after.as_millis()
                    ))
                    .into_http())
                }
            }
        })
    }
}
