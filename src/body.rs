//! The one response/request body type used across the gateway, and helpers to build it.
//!
//! Origin bodies are streamed through as they are (`Incoming` boxed); synthetic pages are
//! `Full<Bytes>` boxed. Boxing unifies the types; the allocation is one per response.

use bytes::Bytes;
use http_body_util::{combinators::BoxBody, BodyExt, Empty, Full};

/// The body error type: anything boxed, so origin I/O errors propagate to hyper, which then
/// aborts the client connection instead of sending a truncated response as if complete.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The body type of every response the gateway produces.
pub type Body = BoxBody<Bytes, BoxError>;

/// An empty body.
pub fn empty() -> Body {
    Empty::<Bytes>::new()
        .map_err(|never| match never {})
        .boxed()
}

/// A body holding `data`.
pub fn full(data: impl Into<Bytes>) -> Body {
    Full::new(data.into())
        .map_err(|never| match never {})
        .boxed()
}

/// Boxes any body whose error converts into [`BoxError`].
pub fn boxed<B>(body: B) -> Body
where
    B: http_body::Body<Data = Bytes> + Send + Sync + 'static,
    B::Error: Into<BoxError>,
{
    body.map_err(Into::into).boxed()
}

/// The error a [`Limited`] body yields once more than its limit has been read. The proxy
/// finds it in an upstream error's source chain and answers `413` instead of `502`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("request body larger than {limit} bytes")]
pub struct BodyTooLarge {
    /// The limit that was exceeded, in bytes.
    pub limit: u64,
}

pin_project_lite::pin_project! {
    /// Passes a body through frame by frame and fails with [`BodyTooLarge`] as soon as more
    /// than `limit` bytes of data went by. Nothing is buffered.
    pub struct Limited<B> {
        #[pin]
        inner: B,
        remaining: u64,
        limit: u64,
    }
}

impl<B> Limited<B> {
    /// Wraps `inner`, allowing at most `limit` bytes of data.
    pub fn new(inner: B, limit: u64) -> Self {
        Limited {
            inner,
            remaining: limit,
            limit,
        }
    }
}

impl<B> http_body::Body for Limited<B>
where
    B: http_body::Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, BoxError>>> {
        use std::task::Poll;
        let this = self.project();
        match this.inner.poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    let len = data.len() as u64;
                    if len > *this.remaining {
                        *this.remaining = 0;
                        return Poll::Ready(Some(Err(Box::new(BodyTooLarge {
                            limit: *this.limit,
                        }))));
                    }
                    *this.remaining -= len;
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e.into()))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, StreamBody};

    fn chunks(sizes: &[usize]) -> impl http_body::Body<Data = Bytes, Error = BoxError> {
        let frames: Vec<Result<http_body::Frame<Bytes>, BoxError>> = sizes
            .iter()
            .map(|n| Ok(http_body::Frame::data(Bytes::from(vec![b'x'; *n]))))
            .collect();
        StreamBody::new(futures_util::stream::iter(frames))
    }

    #[tokio::test]
    async fn limited_passes_bodies_up_to_the_limit() {
        let body = Limited::new(chunks(&[4, 4, 2]), 10);
        let all = body.collect().await.map(|c| c.to_bytes().len());
        assert_eq!(all.ok(), Some(10));
    }

    #[tokio::test]
    async fn limited_fails_mid_stream_beyond_the_limit() {
        let mut body = Limited::new(chunks(&[4, 4, 4]), 10);
        let mut seen = 0;
        let err = loop {
            match body.frame().await {
                Some(Ok(f)) => seen += f.into_data().map(|d| d.len()).unwrap_or(0),
                Some(Err(e)) => break e,
                None => panic!("no error"),
            }
        };
        assert_eq!(seen, 8);
        assert_eq!(
            err.downcast_ref::<BodyTooLarge>(),
            Some(&BodyTooLarge { limit: 10 })
        );
    }
}
