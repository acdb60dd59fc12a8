//! The response body of the layer, and buffering of the inner service's body with a cap.

use std::collections::VecDeque;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use pin_project_lite::pin_project;

use crate::error::BoxError;

pin_project! {
    /// The body of a response from [`StampedeService`](super::StampedeService): a buffered
    /// (usually cached) body, or the inner service's body streamed through.
    #[project = Proj]
    pub struct ResponseBody<B> {
        #[pin]
        kind: Kind<B>,
    }
}

pin_project! {
    #[project = KindProj]
    enum Kind<B> {
        Full { data: Option<Bytes> },
        Stream { prefix: VecDeque<Bytes>, rest: Pin<Box<B>> },
    }
}

impl<B> ResponseBody<B> {
    pub(crate) fn full(data: Bytes) -> Self {
        ResponseBody {
            kind: Kind::Full {
                data: (!data.is_empty()).then_some(data),
            },
        }
    }

    pub(crate) fn empty() -> Self {
        ResponseBody {
            kind: Kind::Full { data: None },
        }
    }

    pub(crate) fn stream(prefix: VecDeque<Bytes>, rest: Pin<Box<B>>) -> Self {
        ResponseBody {
            kind: Kind::Stream { prefix, rest },
        }
    }
}

impl<B> std::fmt::Debug for ResponseBody<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ResponseBody")
    }
}

impl<B> Body for ResponseBody<B>
where
    B: Body,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.project().kind.project() {
            KindProj::Full { data } => Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
            KindProj::Stream { prefix, rest } => {
                if let Some(d) = prefix.pop_front() {
                    return Poll::Ready(Some(Ok(Frame::data(d))));
                }
                match rest.as_mut().poll_frame(cx) {
                    Poll::Ready(Some(Ok(f))) => {
                        Poll::Ready(Some(Ok(f.map_data(|mut d| d.copy_to_bytes(d.remaining())))))
                    }
                    Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e.into()))),
                    Poll::Ready(None) => Poll::Ready(None),
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Full { data } => data.is_none(),
            Kind::Stream { prefix, rest } => prefix.is_empty() && rest.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Full { data } => {
                SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64))
            }
            Kind::Stream { prefix, rest } => {
                let p: u64 = prefix.iter().map(|b| b.len() as u64).sum();
                let h = rest.size_hint();
                let mut out = SizeHint::new();
                out.set_lower(h.lower() + p);
                if let Some(u) = h.upper() {
                    out.set_upper(u + p);
                }
                out
            }
        }
    }
}

/// A body read up to a cap.
pub(crate) enum Buffered<B> {
    /// The whole body.
    Complete(Bytes),
    /// Larger than the cap: what was read, and the rest still to stream.
    Overflow {
        prefix: VecDeque<Bytes>,
        rest: Pin<Box<B>>,
    },
}

/// Reads `body` whole if it is at most `max` bytes.
pub(crate) async fn buffer<B>(mut body: Pin<Box<B>>, max: usize) -> Result<Buffered<B>, BoxError>
where
    B: Body,
    B::Error: Into<BoxError>,
{
    let mut chunks: VecDeque<Bytes> = VecDeque::new();
    let mut len = 0usize;
    if body.size_hint().lower() > max as u64 {
        return Ok(Buffered::Overflow {
            prefix: chunks,
            rest: body,
        });
    }
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(Into::into)?;
        if let Ok(mut data) = frame.into_data() {
            let d = data.copy_to_bytes(data.remaining());
            len += d.len();
            chunks.push_back(d);
            if len > max {
                return Ok(Buffered::Overflow {
                    prefix: chunks,
                    rest: body,
                });
            }
        }
        // Trailers of a cached response are dropped: they cannot be replayed faithfully.
    }
    Ok(Buffered::Complete(match chunks.len() {
        0 => Bytes::new(),
        1 => chunks.pop_front().unwrap_or_default(),
        _ => {
            let mut v = Vec::with_capacity(len);
            for c in chunks {
                v.extend_from_slice(&c);
            }
            Bytes::from(v)
        }
    }))
}
