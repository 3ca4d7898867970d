//! The front: the gRPC API (Cocos-compatible service, the operator's
//! extension service, health, reflection) and the HTTP health/metrics
//! endpoint. It only turns requests into
//! messages for the supervisor, each with a deadline.

pub mod grpc;
pub mod http;
pub mod logs;
pub mod operator;
pub mod tls;

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::{Duration, Instant};

use futures::Stream;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tonic::transport::server::{Connected, TcpConnectInfo};
use tracing::warn;

/// Counters of the gRPC front, for `/metrics`.
pub(crate) struct FrontStats {
    /// gRPC connections open now.
    pub connections: AtomicU64,
    /// `MANAGER_GRPC_MAX_CONNECTIONS` in force.
    pub max_connections: AtomicU64,
    /// Connections closed at once because the cap was reached.
    pub refused: AtomicU64,
    /// Connections closed because they sent nothing in time.
    pub silent: AtomicU64,
    /// Requests answered DEADLINE_EXCEEDED by the manager.
    pub deadline_exceeded: AtomicU64,
}

pub(crate) static STATS: FrontStats = FrontStats {
    connections: AtomicU64::new(0),
    max_connections: AtomicU64::new(0),
    refused: AtomicU64::new(0),
    silent: AtomicU64::new(0),
    deadline_exceeded: AtomicU64::new(0),
};

/// How often a refused connection is logged at most (the count since the
/// last line is included), so a flood does not flood the log.
const REFUSAL_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// Accepted connections, at most `max` open at once. A connection beyond
/// the cap is closed at once, before any byte (the client sees the
/// connection closed and fails fast), rather than left waiting in the
/// listen backlog until its own deadline; a slot frees as soon as any
/// connection closes. Each connection must send its first bytes within `first_bytes`
/// or it is closed, so silent sockets cannot hold the slots.
pub(crate) struct LimitedIncoming<S> {
    inner: S,
    slots: Arc<Semaphore>,
    max: usize,
    first_bytes: Duration,
    refused_since_log: u64,
    last_log: Option<Instant>,
}

impl<S> LimitedIncoming<S> {
    pub(crate) fn new(inner: S, max: usize, first_bytes: Duration) -> LimitedIncoming<S> {
        STATS.max_connections.store(max as u64, Ordering::Relaxed);
        LimitedIncoming {
            inner,
            slots: Arc::new(Semaphore::new(max)),
            max,
            first_bytes,
            refused_since_log: 0,
            last_log: None,
        }
    }

    fn refuse(&mut self, stream: TcpStream) {
        STATS.refused.fetch_add(1, Ordering::Relaxed);
        self.refused_since_log += 1;
        let now = Instant::now();
        if self
            .last_log
            .is_none_or(|last| now.duration_since(last) >= REFUSAL_LOG_INTERVAL)
        {
            warn!(
                peer = ?stream.peer_addr().ok(),
                refused = self.refused_since_log,
                max = self.max,
                "gRPC connection refused: MANAGER_GRPC_MAX_CONNECTIONS connections are open"
            );
            self.last_log = Some(now);
            self.refused_since_log = 0;
        }
        drop(stream);
    }
}

impl<S> Stream for LimitedIncoming<S>
where
    S: Stream<Item = io::Result<TcpStream>> + Unpin,
{
    type Item = io::Result<LimitedConn>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        loop {
            let stream = match ready!(Pin::new(&mut self.inner).poll_next(cx)) {
                None => return Poll::Ready(None),
                Some(Err(e)) => return Poll::Ready(Some(Err(e))),
                Some(Ok(stream)) => stream,
            };
            match self.slots.clone().try_acquire_owned() {
                Ok(slot) => {
                    STATS.connections.fetch_add(1, Ordering::Relaxed);
                    return Poll::Ready(Some(Ok(LimitedConn {
                        stream,
                        _slot: Slot(slot),
                        first_bytes: Some(Box::pin(tokio::time::sleep(self.first_bytes))),
                        first_bytes_limit: self.first_bytes,
                    })));
                }
                Err(_) => self.refuse(stream),
            }
        }
    }
}

/// A connection's place under the cap; given back when the connection is
/// dropped.
struct Slot(#[allow(dead_code)] OwnedSemaphorePermit);

impl Drop for Slot {
    fn drop(&mut self) {
        STATS.connections.fetch_sub(1, Ordering::Relaxed);
    }
}

/// An accepted connection holding its slot.
pub(crate) struct LimitedConn {
    stream: TcpStream,
    _slot: Slot,
    /// Runs until the peer's first bytes arrive.
    first_bytes: Option<Pin<Box<tokio::time::Sleep>>>,
    first_bytes_limit: Duration,
}

impl Connected for LimitedConn {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> TcpConnectInfo {
        self.stream.connect_info()
    }
}

impl AsyncRead for LimitedConn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        match Pin::new(&mut this.stream).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if buf.filled().len() > before {
                    this.first_bytes = None;
                }
                Poll::Ready(Ok(()))
            }
            Poll::Pending => {
                if let Some(timer) = this.first_bytes.as_mut() {
                    if timer.as_mut().poll(cx).is_ready() {
                        this.first_bytes = None;
                        STATS.silent.fetch_add(1, Ordering::Relaxed);
                        return Poll::Ready(Err(io::Error::new(
                            io::ErrorKind::TimedOut,
                            format!(
                                "the client sent nothing within {:?} of connecting",
                                this.first_bytes_limit
                            ),
                        )));
                    }
                }
                Poll::Pending
            }
            other => other,
        }
    }
}

impl AsyncWrite for LimitedConn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
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

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}
