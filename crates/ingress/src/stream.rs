//! Streams passed through as they come (SSE, chunked answers, upgraded
//! connections), cut only after a long time with nothing in either
//! direction.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use hyper::body::{Frame, Incoming, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::load::Busy;

/// An answer's body on its way out. The machine counts as busy until it
/// ends; a body that sends nothing for `idle` is cut off.
pub(crate) struct Tracked {
    inner: Incoming,
    _busy: Busy,
    idle: Duration,
    /// Set only once the machine keeps the body waiting: most answers are
    /// whole by the time they are read, and cost no timer.
    timer: Option<Pin<Box<tokio::time::Sleep>>>,
    /// A frame went out since the timer was set.
    moved: bool,
}

impl Tracked {
    pub(crate) fn new(inner: Incoming, busy: Busy, idle: Duration) -> Tracked {
        Tracked {
            inner,
            _busy: busy,
            idle,
            timer: None,
            moved: false,
        }
    }
}

impl hyper::body::Body for Tracked {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(frame) => {
                this.moved = true;
                Poll::Ready(frame.map(|r| r.map_err(Into::into)))
            }
            Poll::Pending => {
                let idle = this.idle;
                let timer = match &mut this.timer {
                    Some(timer) => {
                        if std::mem::take(&mut this.moved) {
                            timer.as_mut().reset(tokio::time::Instant::now() + idle);
                        }
                        timer
                    }
                    None => this.timer.insert(Box::pin(tokio::time::sleep(idle))),
                };
                match timer.as_mut().poll(cx) {
                    Poll::Ready(()) => Poll::Ready(Some(Err(format!(
                        "the machine's answer sent nothing for {idle:?}: cut off"
                    )
                    .into()))),
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Relays an upgraded connection both ways until either side closes it
/// or nothing passes for `idle`.
pub(crate) async fn tunnel<A, B>(client: A, machine: B, idle: Duration)
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let epoch = Instant::now();
    let last = Arc::new(AtomicU64::new(0));
    let mut client = Watched {
        inner: client,
        epoch,
        last: last.clone(),
    };
    let mut machine = machine;
    let quiet = async {
        loop {
            let since = epoch + Duration::from_millis(last.load(Ordering::Relaxed));
            let until = since + idle;
            if Instant::now() >= until {
                return;
            }
            tokio::time::sleep_until(until.into()).await;
        }
    };
    tokio::select! {
        _ = tokio::io::copy_bidirectional(&mut client, &mut machine) => {}
        () = quiet => {}
    }
}

/// A stream that notes when bytes last went through it.
struct Watched<T> {
    inner: T,
    epoch: Instant,
    last: Arc<AtomicU64>,
}

impl<T> Watched<T> {
    fn touch(&self) {
        self.last
            .store(self.epoch.elapsed().as_millis() as u64, Ordering::Relaxed);
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Watched<T> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.touch();
        }
        polled
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Watched<T> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, data);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            self.touch();
        }
        polled
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
