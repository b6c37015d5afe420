//! The HTTP/1.1 server both front doors run on, with the connection limits `axum::serve`
//! lacks: a client must send a complete request header within `header_timeout` of opening
//! the connection (or of starting a request), and a keep-alive connection idle for
//! `idle_timeout` is closed. Slow or silent clients therefore cannot hold connections
//! forever. Upgraded connections (WebSockets) are left alone.
//!
//! hyper's own `header_read_timeout` starts when a connection becomes idle, so it cannot
//! tell a slow header from an idle keep-alive connection: the phases of each connection are
//! tracked here instead, by the connection's IO (bytes arriving) and by its service (a
//! request handed to the router, its response finished).

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::extract::Request;
use axum::response::Response;
use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio::time::{Instant, Sleep};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt;

/// How long clients may take; `Default` holds the defaults.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionLimits {
    /// From a connection's first byte of a request (or its opening) to the end of the
    /// request's header.
    pub header_timeout: Duration,
    /// How long a keep-alive connection may wait for its next request.
    pub idle_timeout: Duration,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        ConnectionLimits {
            header_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(120),
        }
    }
}

/// Serves `app` on `listener` until `stop` resolves; then stops accepting, lets every
/// connection finish its request in flight (keep-alive connections close after it), and
/// returns once all have closed. `map_request` runs before routing (e.g. to normalise paths).
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: ConnectionLimits,
    map_request: fn(Request) -> Request,
    stop: impl Future<Output = ()>,
) {
    // A handler that panics answers 500 instead of dropping its client's connection.
    let app = app.layer(tower_http::catch_panic::CatchPanicLayer::new());
    let stopping = CancellationToken::new();
    let connections = TaskTracker::new();
    let mut stop = std::pin::pin!(stop);
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = &mut stop => break,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of file descriptors, most likely: wait instead of spinning.
                tracing::warn!(error = %e, "accepting a connection failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let phase = Arc::new(Mutex::new(Phase::Head(Instant::now())));
        let io = TokioIo::new(TimedIo::new(stream, phase.clone(), limits));
        let service = {
            let app = app.clone();
            let phase = phase.clone();
            tower::service_fn(move |request: Request<hyper::body::Incoming>| {
                set(&phase, Phase::Busy);
                let phase = phase.clone();
                let request = map_request(request.map(Body::new));
                let app = app.clone();
                async move {
                    let response = app.oneshot(request).await?;
                    Ok::<_, std::convert::Infallible>(track_end(response, phase))
                }
            })
        };
        let stopping = stopping.clone();
        connections.spawn(async move {
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .serve_connection(io, hyper_util::service::TowerToHyperService::new(service))
                .with_upgrades();
            let mut connection = std::pin::pin!(connection);
            let result = tokio::select! {
                result = connection.as_mut() => result,
                () = stopping.cancelled() => {
                    connection.as_mut().graceful_shutdown();
                    connection.await
                }
            };
            if let Err(e) = result {
                tracing::debug!(error = %e, "connection ended with an error");
            }
        });
    }
    stopping.cancel();
    connections.close();
    connections.wait().await;
}

/// Where a connection is in its life.
#[derive(Debug, Clone, Copy)]
enum Phase {
    /// Waiting for the rest of a request header (or the first byte of the first request),
    /// since then.
    Head(Instant),
    /// A request is being served.
    Busy,
    /// Waiting for the next request on a kept-alive connection, since then.
    Idle(Instant),
    /// Handed over to a WebSocket (or another protocol): no limits here any more.
    Upgraded,
}

fn set(phase: &Mutex<Phase>, to: Phase) {
    *phase.lock().unwrap_or_else(|p| p.into_inner()) = to;
}

fn get(phase: &Mutex<Phase>) -> Phase {
    *phase.lock().unwrap_or_else(|p| p.into_inner())
}

/// The connection becomes idle once its response has been sent whole (or dropped).
fn track_end(response: Response, phase: Arc<Mutex<Phase>>) -> Response {
    if response.status() == axum::http::StatusCode::SWITCHING_PROTOCOLS {
        set(&phase, Phase::Upgraded);
        return response;
    }
    response.map(|body| {
        Body::new(EndSignal {
            inner: body,
            phase: Some(phase),
        })
    })
}

/// A response body that marks its connection idle when it ends.
struct EndSignal {
    inner: Body,
    phase: Option<Arc<Mutex<Phase>>>,
}

impl EndSignal {
    fn finish(&mut self) {
        if let Some(phase) = self.phase.take() {
            set(&phase, Phase::Idle(Instant::now()));
        }
    }
}

impl http_body::Body for EndSignal {
    type Data = axum::body::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if matches!(polled, Poll::Ready(None) | Poll::Ready(Some(Err(_)))) {
            self.finish();
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for EndSignal {
    fn drop(&mut self) {
        self.finish();
    }
}

/// A TCP stream whose reads fail with `TimedOut` when the connection has waited too long
/// for a request header, or for its next request.
struct TimedIo {
    stream: tokio::net::TcpStream,
    phase: Arc<Mutex<Phase>>,
    limits: ConnectionLimits,
    timer: Pin<Box<Sleep>>,
}

impl TimedIo {
    fn new(
        stream: tokio::net::TcpStream,
        phase: Arc<Mutex<Phase>>,
        limits: ConnectionLimits,
    ) -> Self {
        TimedIo {
            stream,
            phase,
            limits,
            timer: Box::pin(tokio::time::sleep(Duration::ZERO)),
        }
    }

    /// When the current wait must end, if it is bounded.
    fn deadline(&self) -> Option<Instant> {
        match get(&self.phase) {
            Phase::Head(since) => Some(since + self.limits.header_timeout),
            Phase::Idle(since) => Some(since + self.limits.idle_timeout),
            Phase::Busy | Phase::Upgraded => None,
        }
    }
}

impl AsyncRead for TimedIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.stream).poll_read(cx, buf);
        match polled {
            Poll::Ready(Ok(())) => {
                if buf.filled().len() > before {
                    // The first bytes of a new request: its header must now come in time.
                    let mut phase = self.phase.lock().unwrap_or_else(|p| p.into_inner());
                    if let Phase::Idle(_) = *phase {
                        *phase = Phase::Head(Instant::now());
                    }
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => {
                let Some(deadline) = self.deadline() else {
                    return Poll::Pending;
                };
                if Instant::now() >= deadline {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "the client took too long to send a request",
                    )));
                }
                self.timer.as_mut().reset(deadline);
                // Registers the wake-up; the next poll re-checks the deadline.
                let _ = self.timer.as_mut().poll(cx);
                Poll::Pending
            }
        }
    }
}

impl AsyncWrite for TimedIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, data)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}
