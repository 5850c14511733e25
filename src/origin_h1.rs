//! One HTTP/1.1 exchange with a plain-`http` origin, run inside the request's own task: the
//! fast path of [`crate::origin_pool`] for `GET` and `HEAD` requests without a body, which
//! are nearly all the requests a site gets.
//!
//! hyper's client runs each origin connection as a task of its own and hands requests and
//! responses to it over channels. On the benchmark machine that hand-over (the second task's
//! polls and wake-ups, the channel sends, the request copied into the channel) was the
//! largest part of the gap to nginx that was left (`docs/benchmarks.md`, "Eleventh session").
//! Here the request's task writes the request and reads the response itself.
//!
//! What is written: `METHOD target HTTP/1.1`, the headers as [`crate::proxy`] prepared them,
//! and an empty line. Nothing else: no body, no `Transfer-Encoding`, and a request is only
//! sent this way when it has no body, no upgrade and one of the two methods
//! ([`takes_fast_path`]). The origin therefore cannot disagree with the gateway about where
//! the request ends. The target must start with `/` and be printable ASCII without spaces
//! ([`is_valid_target`]), so it cannot end the request line early; a request whose target is
//! not goes through hyper's client instead. Header names and values cannot hold line breaks
//! (the `http` crate refuses them).
//!
//! What is read, strictly, with [`httparse`] (the parser hyper itself uses):
//! - the status line and at most [`MAX_HEADERS`] headers in at most [`MAX_HEAD`] bytes;
//!   obsolete line folding, spaces before the colon and anything else `httparse` refuses
//!   are errors;
//! - informational responses (`100`, `103`, ...) are skipped, at most
//!   [`MAX_INFORMATIONAL`] of them; a `101` that nobody asked for is an error;
//! - the body's framing, as RFC 9112 §6.3 orders it: none for `HEAD`, `204` and `304`;
//!   chunked when `Transfer-Encoding` says so; `Content-Length` bytes; otherwise until the
//!   origin closes.
//!
//! What fails closed (an error, so a `502` or a broken client response, and the connection
//! is closed): a `Transfer-Encoding` other than exactly `chunked`; `Transfer-Encoding`
//! together with `Content-Length`, or in an HTTP/1.0 response (RFC 9112 calls both faulty
//! framing; hyper would frame by the chunks and close); a `Content-Length` that is not one
//! number (repeats of the same number are accepted); a malformed chunk; the connection ending
//! before the body does.
//!
//! When a connection is reused: only after an HTTP/1.1 response without `Connection: close`
//! whose body was framed by length or chunks (or had none) and read exactly to its end, with
//! no byte left over. Bytes the origin sends beyond a response, or while the connection is
//! idle ([`Conn::is_reusable`]), close the connection instead of being read as the next
//! response.

use std::future::Future as _;
use std::io;
use std::mem::MaybeUninit;
use std::pin::pin;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes, BytesMut};
use http::header::{self, HeaderName, HeaderValue};
use http::{HeaderMap, Method, Request, StatusCode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The largest response head read (status line and headers), in bytes.
pub const MAX_HEAD: usize = 64 * 1024;
/// The most headers a response head may have (hyper's default too).
pub const MAX_HEADERS: usize = 100;
/// The most informational (`1xx`) responses skipped before the final one.
pub const MAX_INFORMATIONAL: usize = 8;
/// The longest chunk-size line or trailer section accepted, in bytes.
const MAX_CHUNK_LINE: usize = 4 * 1024;
/// A new connection's read buffer, in bytes; a read of a head never has less room than
/// half of it.
const READ_BUFFER: usize = 8 * 1024;
/// A read of a body that did not arrive with its head never has less room than half of
/// this (fewer system calls for large bodies; the memory is freed as the client takes it).
const BODY_READ: usize = 32 * 1024;
/// An idle connection whose read buffer grew past this (a large body was streamed through it)
/// gets a fresh, small one before it is pooled.
const KEEP_BUFFER: usize = 64 * 1024;

/// Why an exchange failed.
#[derive(Debug, thiserror::Error)]
pub enum ExchangeError {
    /// The connection failed or was closed before a byte of the response arrived: the
    /// request may be repeated on a fresh connection if it is idempotent and the connection
    /// was a reused one (the origin's keep-alive timeout racing our reuse).
    #[error("origin closed the connection without answering")]
    Unanswered(#[source] Option<io::Error>),
    /// The connection failed during the response.
    #[error("origin connection failed during the response")]
    Io(#[source] io::Error),
    /// The connection ended before the response did.
    #[error("origin closed the connection before the response ended")]
    Truncated,
    /// The response broke HTTP/1.1 or one of the rules in the module docs.
    #[error("malformed response from origin: {0}")]
    Malformed(&'static str),
    /// The request target could not be written into a request line ([`encode`]); nothing
    /// was sent.
    #[error("request target not writable as origin-form")]
    InvalidTarget,
}

/// Whether `req` may take the fast path: `GET` or `HEAD`, no body, no upgrade, and a target
/// [`encode`] writes (anything else goes through hyper's client, as before the fast path).
pub fn eligible<B: http_body::Body>(req: &Request<B>) -> bool {
    takes_fast_path(
        req.method(),
        req.body().is_end_stream(),
        req.headers().contains_key(header::UPGRADE)
            || req.headers().contains_key(header::TRANSFER_ENCODING),
        origin_form(req),
    )
}

/// The one rule of [`eligible`], for a caller that knows the parts without a request to
/// look them up in ([`crate::proxy`]): `GET` or `HEAD`, no body, no upgrade (nor transfer
/// coding), and a `target` that [`encode`] writes.
pub fn takes_fast_path(method: &Method, bodiless: bool, upgrade: bool, target: &str) -> bool {
    (method == Method::GET || method == Method::HEAD)
        && bodiless
        && !upgrade
        && is_valid_target(target)
}

/// The origin-form target of `req`'s URI (`/` if it has no path).
pub fn origin_form<B>(req: &Request<B>) -> &str {
    req.uri().path_and_query().map_or("/", |pq| pq.as_str())
}

/// Whether [`encode`] writes `target`: it starts with `/` and is printable ASCII without
/// spaces.
pub fn is_valid_target(target: &str) -> bool {
    target.starts_with('/') && target.bytes().all(|b| b.is_ascii_graphic())
}

/// Writes the head of `req` with the origin-form `target` into `out`, replacing what was
/// there.
///
/// # Errors
/// [`ExchangeError::InvalidTarget`] unless `target` starts with `/` and is printable ASCII
/// without spaces: anything else could end the request line early (the proxy builds it from
/// parts that are valid already; this is the last check before the bytes are written).
pub fn encode<B>(req: &Request<B>, target: &str, out: &mut Vec<u8>) -> Result<(), ExchangeError> {
    if !is_valid_target(target) {
        return Err(ExchangeError::InvalidTarget);
    }
    out.clear();
    out.extend_from_slice(req.method().as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(target.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    for (name, value) in req.headers() {
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
    Ok(())
}

/// An open connection to the origin, between exchanges or in one.
#[derive(Debug)]
pub struct Conn {
    io: TcpStream,
    /// Bytes read and not yet used.
    rbuf: BytesMut,
    /// The request head being sent.
    pub wbuf: Vec<u8>,
    scratch: Scratch,
}

impl Conn {
    /// Wraps a connected stream.
    pub fn new(io: TcpStream) -> Self {
        Conn {
            io,
            rbuf: BytesMut::with_capacity(READ_BUFFER),
            wbuf: Vec::new(),
            scratch: Scratch::default(),
        }
    }

    /// Whether an idle connection can take a request: nothing arrived on it since its last
    /// response (no early bytes, no end of stream). Costs a system call only when the
    /// socket reports itself readable.
    pub fn is_reusable(&self) -> bool {
        let mut cx = Context::from_waker(std::task::Waker::noop());
        match self.io.poll_read_ready(&mut cx) {
            Poll::Pending => true,
            Poll::Ready(Err(_)) => false,
            Poll::Ready(Ok(())) => {
                let mut probe = [0u8; 1];
                matches!(self.io.try_read(&mut probe), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
            }
        }
    }

    /// Sends the request head in [`Conn::wbuf`] and reads the response head.
    ///
    /// # Errors
    /// [`ExchangeError`]; the connection must then be dropped.
    pub async fn exchange(&mut self, head_request: bool) -> Result<Head, ExchangeError> {
        self.io
            .write_all(&self.wbuf)
            .await
            .map_err(|e| ExchangeError::Unanswered(Some(e)))?;
        let mut informational = 0;
        let mut received = false;
        loop {
            if !self.rbuf.is_empty() {
                if let Some(head) = parse_head(&mut self.rbuf, head_request, &mut self.scratch)? {
                    if head.status.is_informational() {
                        informational += 1;
                        if informational > MAX_INFORMATIONAL {
                            return Err(ExchangeError::Malformed("too many 1xx responses"));
                        }
                        continue;
                    }
                    return Ok(head);
                }
                if self.rbuf.len() >= MAX_HEAD {
                    return Err(ExchangeError::Malformed("response head too large"));
                }
            }
            reserve(&mut self.rbuf, READ_BUFFER);
            match self.io.read_buf(&mut self.rbuf).await {
                Ok(0) if received => return Err(ExchangeError::Truncated),
                Ok(0) => return Err(ExchangeError::Unanswered(None)),
                Ok(_) => received = true,
                Err(e) if received => return Err(ExchangeError::Io(e)),
                Err(e) => return Err(ExchangeError::Unanswered(Some(e))),
            }
        }
    }

    /// Reads more of the response into the buffer: `Ok(0)` at the end of the stream.
    pub fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        reserve(&mut self.rbuf, BODY_READ);
        // `read_buf` goes through `AsyncRead::poll_read`, which (unlike `try_read`) notes a
        // short read as "drained", so the next read waits for the socket instead of asking it.
        pin!(self.io.read_buf(&mut self.rbuf)).poll(cx)
    }

    /// The bytes read and not yet used.
    pub fn buffer(&mut self) -> &mut BytesMut {
        &mut self.rbuf
    }

    /// Readies the connection for the pool; `false` if it must not be reused because bytes
    /// beyond the response are waiting in its buffer.
    pub fn reset(&mut self) -> bool {
        if !self.rbuf.is_empty() {
            return false;
        }
        if self.rbuf.capacity() > KEEP_BUFFER {
            self.rbuf = BytesMut::with_capacity(READ_BUFFER);
        }
        true
    }
}

/// Makes room for a read: at least half of `size`.
fn reserve(buf: &mut BytesMut, size: usize) {
    if buf.capacity() - buf.len() < size / 2 {
        buf.reserve(size);
    }
}

/// A final response head, and how its body is framed.
#[derive(Debug)]
pub struct Head {
    /// The status (`1xx` only from [`parse_head`], never from [`Conn::exchange`]).
    pub status: StatusCode,
    /// The headers as the origin sent them (values share the read buffer's memory).
    pub headers: HeaderMap,
    /// Reads the body.
    pub body: Decoder,
    /// Whether the connection may carry another request after this response.
    pub keep_alive: bool,
}

/// Where a header's name and value are in a head being parsed.
#[derive(Debug, Clone, Copy)]
struct At {
    name: (usize, usize),
    value: (usize, usize),
}

/// Room for [`parse_head`] to note where the headers are, kept with the connection so that
/// no request allocates or clears it whole.
#[derive(Debug, Default)]
pub struct Scratch(Vec<At>);

/// Parses a response head at the start of `buf` and removes it from `buf`. `Ok(None)`: more
/// bytes are needed. Informational heads are returned too (and consumed); their headers are
/// not. `Transfer-Encoding`, and a `Connection` that names no other header, are read for
/// the framing and left out of the headers: they concern this hop only, and the proxy would
/// remove them anyway.
///
/// # Errors
/// [`ExchangeError::Malformed`] for anything the module docs refuse.
pub fn parse_head(
    buf: &mut BytesMut,
    head_request: bool,
    scratch: &mut Scratch,
) -> Result<Option<Head>, ExchangeError> {
    let mut slots: [MaybeUninit<httparse::Header<'_>>; MAX_HEADERS] =
        [const { MaybeUninit::uninit() }; MAX_HEADERS];
    let mut response = httparse::Response::new(&mut []);
    let base = buf.as_ptr() as usize;
    let at = &mut scratch.0;
    at.clear();
    let (len, code, version) = match httparse::ParserConfig::default()
        .parse_response_with_uninit_headers(&mut response, &buf[..], &mut slots)
    {
        Ok(httparse::Status::Partial) => return Ok(None),
        Ok(httparse::Status::Complete(len)) => {
            at.extend(response.headers.iter().map(|h| {
                let name = h.name.as_ptr() as usize - base;
                let value = h.value.as_ptr() as usize - base;
                At {
                    name: (name, name + h.name.len()),
                    value: (value, value + h.value.len()),
                }
            }));
            (
                len,
                response.code.unwrap_or(0),
                response.version.unwrap_or(0),
            )
        }
        Err(httparse::Error::TooManyHeaders) => {
            return Err(ExchangeError::Malformed("too many headers"))
        }
        Err(_) => return Err(ExchangeError::Malformed("unparsable response head")),
    };
    let head = buf.split_to(len).freeze();
    let status =
        StatusCode::from_u16(code).map_err(|_| ExchangeError::Malformed("invalid status code"))?;
    if status == StatusCode::SWITCHING_PROTOCOLS {
        return Err(ExchangeError::Malformed("unrequested protocol switch"));
    }
    if status.is_informational() {
        return Ok(Some(Head {
            status,
            headers: HeaderMap::new(),
            body: Decoder::empty(),
            keep_alive: false,
        }));
    }

    let mut headers = HeaderMap::with_capacity(at.len());
    let mut length: Option<u64> = None;
    let mut chunked = false;
    let mut close = version == 0;
    for a in at.iter() {
        let name = HeaderName::from_bytes(&head[a.name.0..a.name.1])
            .map_err(|_| ExchangeError::Malformed("invalid header name"))?;
        let raw = &head[a.value.0..a.value.1];
        if name == header::CONTENT_LENGTH {
            for n in raw.split(|&b| b == b',') {
                let n = parse_length(trim(n))?;
                if length.is_some_and(|l| l != n) {
                    return Err(ExchangeError::Malformed("conflicting Content-Length"));
                }
                length = Some(n);
            }
        } else if name == header::TRANSFER_ENCODING {
            for coding in raw.split(|&b| b == b',').map(trim) {
                if chunked || !coding.eq_ignore_ascii_case(b"chunked") {
                    return Err(ExchangeError::Malformed("unsupported Transfer-Encoding"));
                }
                chunked = true;
            }
            // Hop-by-hop: the client's side is framed anew.
            continue;
        } else if name == header::CONNECTION {
            let mut names_headers = false;
            for token in raw.split(|&b| b == b',').map(trim) {
                if token.eq_ignore_ascii_case(b"close") {
                    close = true;
                } else if !token.is_empty() && !token.eq_ignore_ascii_case(b"keep-alive") {
                    names_headers = true;
                }
            }
            // Hop-by-hop. Kept only when it names other headers, which the proxy then
            // removes with it (`proxy::strip_hop_by_hop`).
            if !names_headers {
                continue;
            }
        }
        let value = HeaderValue::from_maybe_shared(head.slice(a.value.0..a.value.1))
            .map_err(|_| ExchangeError::Malformed("invalid header value"))?;
        headers.append(name, value);
    }
    if chunked && (length.is_some() || version == 0) {
        return Err(ExchangeError::Malformed(
            "Transfer-Encoding with Content-Length or in HTTP/1.0",
        ));
    }
    let body =
        if head_request || status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED {
            Decoder::empty()
        } else if chunked {
            Decoder {
                state: State::ChunkSize,
            }
        } else if let Some(n) = length {
            Decoder {
                state: State::Length(n),
            }
        } else {
            close = true;
            Decoder {
                state: State::UntilClose,
            }
        };
    Ok(Some(Head {
        status,
        headers,
        body,
        keep_alive: !close,
    }))
}

fn trim(mut s: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = s {
        s = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = s {
        s = rest;
    }
    s
}

/// A `Content-Length` value: decimal digits only.
fn parse_length(s: &[u8]) -> Result<u64, ExchangeError> {
    const BAD: ExchangeError = ExchangeError::Malformed("invalid Content-Length");
    if s.is_empty() {
        return Err(BAD);
    }
    s.iter().try_fold(0u64, |n, &b| {
        if !b.is_ascii_digit() {
            return Err(BAD);
        }
        n.checked_mul(10)
            .and_then(|n| n.checked_add(u64::from(b - b'0')))
            .ok_or(BAD)
    })
}

/// Takes a response body out of the bytes read from the connection.
#[derive(Debug)]
pub struct Decoder {
    state: State,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// This many body bytes to go (0: the end).
    Length(u64),
    /// Expecting a chunk-size line.
    ChunkSize,
    /// Inside a chunk, this many bytes to go.
    ChunkData(u64),
    /// Expecting the CRLF after a chunk's data.
    ChunkEnd,
    /// After the last chunk: optional trailers, then an empty line.
    Trailers,
    /// Everything until the origin closes.
    UntilClose,
    /// The body has ended.
    Done,
}

/// What [`Decoder::decode`] found.
#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    /// Body bytes.
    Data(Bytes),
    /// More bytes must be read first.
    NeedMore,
    /// The body has ended (and nothing of it is left in the buffer).
    End,
}

impl Decoder {
    /// A body of no bytes.
    pub fn empty() -> Self {
        Decoder { state: State::Done }
    }

    /// Whether the body has ended.
    pub fn is_done(&self) -> bool {
        matches!(self.state, State::Done | State::Length(0))
    }

    /// The body bytes still to come, when the framing says.
    pub fn remaining(&self) -> Option<u64> {
        match self.state {
            State::Length(n) => Some(n),
            State::Done => Some(0),
            _ => None,
        }
    }

    /// Whether the body's end is known without the connection closing (so the connection
    /// may be reused).
    pub fn is_delimited(&self) -> bool {
        self.state != State::UntilClose
    }

    /// The next step of the body, taking what it uses from the front of `buf`.
    ///
    /// # Errors
    /// [`ExchangeError::Malformed`] for a malformed chunk or trailer section.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Step, ExchangeError> {
        loop {
            match self.state {
                State::Done | State::Length(0) => {
                    self.state = State::Done;
                    return Ok(Step::End);
                }
                State::Length(n) | State::ChunkData(n) => {
                    if buf.is_empty() {
                        return Ok(Step::NeedMore);
                    }
                    let take = usize::try_from(n).unwrap_or(usize::MAX).min(buf.len());
                    let left = n - take as u64;
                    self.state = match self.state {
                        State::Length(_) if left == 0 => State::Done,
                        State::Length(_) => State::Length(left),
                        _ if left == 0 => State::ChunkEnd,
                        _ => State::ChunkData(left),
                    };
                    return Ok(Step::Data(buf.split_to(take).freeze()));
                }
                State::UntilClose => {
                    if buf.is_empty() {
                        return Ok(Step::NeedMore);
                    }
                    return Ok(Step::Data(buf.split().freeze()));
                }
                State::ChunkSize => match httparse::parse_chunk_size(&buf[..]) {
                    Ok(httparse::Status::Complete((used, size))) => {
                        buf.advance(used);
                        self.state = if size == 0 {
                            State::Trailers
                        } else {
                            State::ChunkData(size)
                        };
                    }
                    Ok(httparse::Status::Partial) if buf.len() < MAX_CHUNK_LINE => {
                        return Ok(Step::NeedMore)
                    }
                    _ => return Err(ExchangeError::Malformed("invalid chunk size")),
                },
                State::ChunkEnd => match buf.get(..2) {
                    None if buf.first().is_none_or(|&b| b == b'\r') => return Ok(Step::NeedMore),
                    Some(b"\r\n") => {
                        buf.advance(2);
                        self.state = State::ChunkSize;
                    }
                    _ => return Err(ExchangeError::Malformed("chunk data longer than its size")),
                },
                State::Trailers => {
                    if buf.starts_with(b"\r\n") {
                        buf.advance(2);
                        self.state = State::Done;
                        continue;
                    }
                    let mut slots = [httparse::EMPTY_HEADER; 32];
                    match httparse::parse_headers(&buf[..], &mut slots) {
                        // Trailers are dropped: the client side is re-framed anyway.
                        Ok(httparse::Status::Complete((used, _))) => {
                            buf.advance(used);
                            self.state = State::Done;
                        }
                        Ok(httparse::Status::Partial) if buf.len() < MAX_CHUNK_LINE => {
                            return Ok(Step::NeedMore)
                        }
                        _ => return Err(ExchangeError::Malformed("invalid trailers")),
                    }
                }
            }
        }
    }

    /// What the end of the stream means now.
    ///
    /// # Errors
    /// [`ExchangeError::Truncated`] unless the body runs until the connection closes (or
    /// has ended).
    pub fn end_of_stream(&mut self) -> Result<(), ExchangeError> {
        match self.state {
            State::UntilClose | State::Done | State::Length(0) => {
                self.state = State::Done;
                Ok(())
            }
            _ => Err(ExchangeError::Truncated),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str, head_request: bool) -> Result<Option<Head>, ExchangeError> {
        parse_head(
            &mut BytesMut::from(text),
            head_request,
            &mut Scratch::default(),
        )
    }

    fn malformed(text: &str) -> &'static str {
        match parse(text, false) {
            Err(ExchangeError::Malformed(why)) => why,
            other => panic!("accepted {text:?}: {other:?}"),
        }
    }

    /// Decodes `wire` fed in pieces of `step` bytes; the data, and whether the end was seen.
    fn decode_all(mut decoder: Decoder, wire: &[u8], step: usize) -> (Vec<u8>, bool, BytesMut) {
        let mut buf = BytesMut::new();
        let mut out = Vec::new();
        let mut fed = 0;
        loop {
            match decoder.decode(&mut buf).expect("decodes") {
                Step::Data(d) => out.extend_from_slice(&d),
                Step::End => return (out, true, buf),
                Step::NeedMore if fed < wire.len() => {
                    let end = (fed + step).min(wire.len());
                    buf.extend_from_slice(&wire[fed..end]);
                    fed = end;
                }
                Step::NeedMore => return (out, false, buf),
            }
        }
    }

    #[test]
    fn a_request_head_is_written_as_prepared() {
        let req = Request::get("/a/b?c=d")
            .header("host", "origin")
            .header("x-two", "1")
            .header("x-two", "2")
            .body(())
            .unwrap();
        let mut out = b"old".to_vec();
        encode(&req, "/a/b?c=d", &mut out).unwrap();
        assert_eq!(
            String::from_utf8(out.clone()).unwrap(),
            "GET /a/b?c=d HTTP/1.1\r\nhost: origin\r\nx-two: 1\r\nx-two: 2\r\n\r\n"
        );
        for bad in ["", "a/b", "/a b", "/a\r\nX: y", "/a\u{e9}", "/a\tb"] {
            assert!(
                matches!(
                    encode(&req, bad, &mut out),
                    Err(ExchangeError::InvalidTarget)
                ),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn only_bodiless_get_and_head_without_upgrade_take_the_fast_path() {
        let empty = || http_body_util::Empty::<Bytes>::new();
        let get = Request::get("/").body(empty()).unwrap();
        let head = Request::head("/").body(empty()).unwrap();
        let post = Request::post("/").body(empty()).unwrap();
        let with_body = Request::get("/")
            .body(http_body_util::Full::new(Bytes::from_static(b"x")))
            .unwrap();
        let upgrade = Request::get("/")
            .header("upgrade", "websocket")
            .body(empty())
            .unwrap();
        let raw_query = Request::get("/q?name=caf\u{e9}").body(empty()).unwrap();
        assert!(eligible(&get) && eligible(&head));
        assert!(!eligible(&post) && !eligible(&with_body) && !eligible(&upgrade));
        assert!(
            !eligible(&raw_query),
            "a target encode refuses goes through hyper"
        );
    }

    #[test]
    fn a_head_is_parsed_and_taken_from_the_buffer() {
        let mut buf = BytesMut::from(
            "HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nSet-Cookie: a=1\r\n\
             Set-Cookie: b=2\r\nContent-Length: 5\r\n\r\nhello",
        );
        let head = parse_head(&mut buf, false, &mut Scratch::default())
            .unwrap()
            .unwrap();
        assert_eq!(head.status, StatusCode::OK);
        assert_eq!(head.headers["content-type"], "text/html");
        assert_eq!(head.headers.get_all("set-cookie").iter().count(), 2);
        assert_eq!(head.body.remaining(), Some(5));
        assert!(head.keep_alive);
        assert_eq!(&buf[..], b"hello");
    }

    #[test]
    fn hop_only_headers_are_left_out_unless_connection_names_others() {
        let head = |text: &str| parse(text, false).unwrap().unwrap().headers;
        let plain =
            head("HTTP/1.1 200 OK\r\nConnection: keep-alive\r\nTransfer-Encoding: chunked\r\n\r\n");
        assert!(plain.get("connection").is_none() && plain.get("transfer-encoding").is_none());
        let naming = head("HTTP/1.1 200 OK\r\nConnection: close, X-Hop\r\nX-Hop: 1\r\n\r\n");
        assert_eq!(naming["connection"], "close, X-Hop");
    }

    #[test]
    fn a_partial_head_needs_more() {
        assert!(parse("HTTP/1.1 200 OK\r\nContent-Le", false)
            .unwrap()
            .is_none());
    }

    #[test]
    fn framing_follows_rfc_9112() {
        let framing = |text: &str, head_request: bool| {
            let head = parse(text, head_request).unwrap().unwrap();
            (
                head.body.remaining(),
                head.body.is_delimited(),
                head.keep_alive,
            )
        };
        // HEAD, 204 and 304 have no body whatever the headers say.
        let cl = "HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n";
        assert_eq!(framing(cl, true), (Some(0), true, true));
        assert_eq!(framing(cl, false), (Some(9), true, true));
        for status in ["204 No Content", "304 Not Modified"] {
            let text = format!("HTTP/1.1 {status}\r\nContent-Length: 9\r\n\r\n");
            assert_eq!(framing(&text, false), (Some(0), true, true));
        }
        // Chunked; then neither: until close, never reused.
        let chunked = "HTTP/1.1 200 OK\r\nTransfer-Encoding: Chunked\r\n\r\n";
        assert_eq!(framing(chunked, false), (None, true, true));
        assert_eq!(
            framing("HTTP/1.1 200 OK\r\n\r\n", false),
            (None, false, false)
        );
        // `Connection: close` and HTTP/1.0 are not reused.
        let close = "HTTP/1.1 200 OK\r\nConnection: keep-alive, Close\r\nContent-Length: 0\r\n\r\n";
        assert_eq!(framing(close, false), (Some(0), true, false));
        let old = "HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n";
        assert_eq!(framing(old, false), (Some(0), true, false));
        // Repeats of one length are one length.
        let same = "HTTP/1.1 200 OK\r\nContent-Length: 3, 3\r\nContent-Length: 3\r\n\r\n";
        assert_eq!(framing(same, false), (Some(3), true, true));
    }

    #[test]
    fn ambiguous_or_broken_heads_are_refused() {
        let cases = [
            "NOT HTTP AT ALL\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: abc\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: +5\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: \r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: 99999999999999999999\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: 5, 6\r\n\r\n",
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n",
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n",
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: identity\r\n\r\n",
            "HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
            "HTTP/1.1 200 OK\r\nX-Folded: a\r\n b\r\n\r\n",
            "HTTP/1.1 200 OK\r\nX-Space : a\r\n\r\n",
            "HTTP/1.1 200 OK\r\nX-Bad: a\x01b\r\n\r\n",
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n",
            "HTTP/1.1 099 Odd\r\n\r\n",
        ];
        for text in cases {
            malformed(text);
        }
        let mut many = String::from("HTTP/1.1 200 OK\r\n");
        for i in 0..=MAX_HEADERS {
            many.push_str(&format!("X-H{i}: v\r\n"));
        }
        many.push_str("\r\n");
        assert_eq!(malformed(&many), "too many headers");
    }

    #[test]
    fn informational_heads_are_consumed_and_flagged() {
        let mut buf = BytesMut::from(
            "HTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
        );
        let first = parse_head(&mut buf, false, &mut Scratch::default())
            .unwrap()
            .unwrap();
        assert!(first.status.is_informational());
        let second = parse_head(&mut buf, false, &mut Scratch::default())
            .unwrap()
            .unwrap();
        assert_eq!(second.status, StatusCode::OK);
        assert!(buf.is_empty());
    }

    #[test]
    fn length_bodies_stop_at_their_length() {
        let wire = b"hello world, and the next response";
        for step in [1, 3, 100] {
            let (data, end, rest) = decode_all(
                Decoder {
                    state: State::Length(11),
                },
                wire,
                step,
            );
            assert_eq!(&data, b"hello world");
            assert!(end);
            // Whatever came after is left for the caller to see (and refuse to reuse).
            assert!(wire[11..].starts_with(&rest));
        }
    }

    #[test]
    fn chunked_bodies_are_decoded_in_any_pieces() {
        let wire = b"5;ext=1\r\nhello\r\n1\r\n \r\nA\r\n0123456789\r\n0\r\nX-Trailer: t\r\n\r\n";
        for step in [1, 2, 7, 1000] {
            let (data, end, rest) = decode_all(
                Decoder {
                    state: State::ChunkSize,
                },
                wire,
                step,
            );
            assert_eq!(&data, b"hello 0123456789", "step {step}");
            assert!(end && rest.is_empty(), "step {step}");
        }
        let (data, end, _) = decode_all(
            Decoder {
                state: State::ChunkSize,
            },
            b"3\r\nabc\r\n0\r\n\r\n",
            100,
        );
        assert_eq!((&data[..], end), (&b"abc"[..], true));
    }

    #[test]
    fn malformed_chunks_are_errors() {
        let cases: [&[u8]; 5] = [
            b"zz\r\nhello\r\n0\r\n\r\n",
            b"3\r\nabcdef\r\n0\r\n\r\n",
            b"3\r\nabc\r\n0\r\nbad trailer\r\n\r\n",
            b"-1\r\n",
            b"ffffffffffffffffff\r\n",
        ];
        for wire in cases {
            let mut decoder = Decoder {
                state: State::ChunkSize,
            };
            let mut buf = BytesMut::from(wire);
            let err = loop {
                match decoder.decode(&mut buf) {
                    Ok(Step::Data(_)) => {}
                    Ok(other) => panic!("{wire:?}: {other:?}"),
                    Err(e) => break e,
                }
            };
            assert!(matches!(err, ExchangeError::Malformed(_)), "{wire:?}");
        }
        // An endless chunk-size line is refused, not buffered.
        let mut decoder = Decoder {
            state: State::ChunkSize,
        };
        let mut buf = BytesMut::from(&[b'1'; MAX_CHUNK_LINE][..]);
        assert!(decoder.decode(&mut buf).is_err());
    }

    #[test]
    fn the_end_of_the_stream_ends_only_close_delimited_bodies() {
        for state in [State::Length(3), State::ChunkSize, State::ChunkData(2)] {
            assert!(matches!(
                Decoder { state }.end_of_stream(),
                Err(ExchangeError::Truncated)
            ));
        }
        let mut until_close = Decoder {
            state: State::UntilClose,
        };
        assert!(until_close.end_of_stream().is_ok());
        assert!(until_close.is_done());
    }
}
