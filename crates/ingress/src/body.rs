//! The bodies the proxy passes either way, as one type: no box and no
//! dynamic call per request.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use hyper::body::{Frame, Incoming, SizeHint};

use crate::stream::Tracked;

pub(crate) type BoxError = Box<dyn std::error::Error + Send + Sync>;

pub(crate) enum Body {
    /// Whole, in memory (kept for a replay, or the proxy's own answers).
    Full(Option<Bytes>),
    /// A client's request, streamed to the machine.
    Incoming(Incoming),
    /// A machine's answer, streamed to the client.
    Tracked(Tracked),
}

impl Body {
    pub(crate) fn full(bytes: Bytes) -> Body {
        Body::Full((!bytes.is_empty()).then_some(bytes))
    }
}

impl hyper::body::Body for Body {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            Body::Full(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
            Body::Incoming(body) => Pin::new(body).poll_frame(cx).map_err(Into::into),
            Body::Tracked(body) => Pin::new(body).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Body::Full(bytes) => bytes.is_none(),
            Body::Incoming(body) => body.is_end_stream(),
            Body::Tracked(body) => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Body::Full(bytes) => SizeHint::with_exact(bytes.as_ref().map_or(0, |b| b.len() as u64)),
            Body::Incoming(body) => body.size_hint(),
            Body::Tracked(body) => body.size_hint(),
        }
    }
}
