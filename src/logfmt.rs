//! How the fields of a text log line are written.
//!
//! Every request is logged (one `info` line), so writing fields is on the hot path.
//! `tracing-subscriber`'s default field formatter routes every field, even a number, through
//! `Debug` and through its colour styles (also when colours are off); this one writes the same
//! text more directly: `message`, then `name=value` pairs separated by spaces, strings quoted
//! as `Debug` quotes them, numbers and booleans as they are, `%`/`?` values through
//! `Display`/`Debug`. Unlike the default, control characters in any value (a newline, an
//! ANSI escape) are always escaped, so no value can forge or colour a log line.
//!
//! [`LineFormat`] writes the rest of the line exactly as `tracing-subscriber`'s default
//! ("full") format does without colours: `2026-11-26T17:40:01.123456Z  INFO
//! span{fields}: target: fields`, but the date and time are formatted once per second per
//! thread instead of for every line.
//!
//! Both are used for `--log-format text` when stderr is not a terminal (on a terminal the
//! default, coloured formatter is kept). JSON lines are written by `tracing-subscriber`'s
//! JSON formatter, which escapes by construction.

use std::cell::RefCell;
use std::fmt::{self, Write as _};
use std::io::{self, Write as _};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_log::NormalizeEvent as _;
use tracing_subscriber::field::RecordFields;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields, FormattedFields, MakeWriter};
use tracing_subscriber::registry::LookupSpan;

/// The event formatter; see the module documentation.
#[derive(Debug, Clone, Copy)]
pub struct LineFormat {
    time: bool,
}

impl LineFormat {
    /// Lines with the UTC time first.
    pub fn new() -> Self {
        LineFormat { time: true }
    }

    /// Lines without the time (tests).
    pub fn without_time() -> Self {
        LineFormat { time: false }
    }
}

impl Default for LineFormat {
    fn default() -> Self {
        Self::new()
    }
}

impl<S, N> FormatEvent<S, N> for LineFormat
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        // Events from the `log` crate carry their real target in fields.
        let normalized = event.normalized_metadata();
        let meta = normalized.as_ref().unwrap_or_else(|| event.metadata());
        if self.time {
            write_now(&mut writer)?;
            writer.write_char(' ')?;
        }
        writer.write_str(match *meta.level() {
            Level::TRACE => "TRACE ",
            Level::DEBUG => "DEBUG ",
            Level::INFO => " INFO ",
            Level::WARN => " WARN ",
            Level::ERROR => "ERROR ",
        })?;
        if let Some(scope) = ctx.event_scope() {
            let mut seen = false;
            for span in scope.from_root() {
                writer.write_str(span.metadata().name())?;
                seen = true;
                let ext = span.extensions();
                if let Some(fields) = ext.get::<FormattedFields<N>>() {
                    if !fields.is_empty() {
                        writer.write_char('{')?;
                        writer.write_str(fields)?;
                        writer.write_char('}')?;
                    }
                }
                writer.write_char(':')?;
            }
            if seen {
                writer.write_char(' ')?;
            }
        }
        writer.write_str(meta.target())?;
        writer.write_str(": ")?;
        ctx.format_fields(writer.by_ref(), event)?;
        writer.write_char('\n')
    }
}

thread_local! {
    /// The second last formatted on this thread and its text (`2026-11-26T17:40:01`).
    static SECOND: RefCell<(u64, String)> = const { RefCell::new((u64::MAX, String::new())) };
}

/// Writes the current UTC time as RFC 3339 with microseconds (`…T17:40:01.123456Z`).
fn write_now(writer: &mut impl fmt::Write) -> fmt::Result {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    SECOND.with(|cell| {
        let mut cached = cell.borrow_mut();
        let secs = now.as_secs();
        if cached.0 != secs {
            cached.1.clear();
            write_second(&mut cached.1, secs)?;
            cached.0 = secs;
        }
        writer.write_str(&cached.1)
    })?;
    write_micros(writer, now.subsec_micros())?;
    writer.write_char('Z')
}

/// `YYYY-MM-DDTHH:MM:SS` of a unix time in seconds, UTC.
fn write_second(out: &mut String, secs: u64) -> fmt::Result {
    let t = i64::try_from(secs)
        .ok()
        .and_then(|s| cookie::time::OffsetDateTime::from_unix_timestamp(s).ok())
        .unwrap_or(cookie::time::OffsetDateTime::UNIX_EPOCH);
    write!(
        out,
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second()
    )
}

/// `.uuuuuu`.
fn write_micros(writer: &mut impl fmt::Write, micros: u32) -> fmt::Result {
    let mut digits = [b'.', b'0', b'0', b'0', b'0', b'0', b'0'];
    let mut rest = micros.min(999_999);
    for d in digits[1..].iter_mut().rev() {
        // `rest % 10` is a single digit.
        *d = b'0' + (rest % 10) as u8;
        rest /= 10;
    }
    writer.write_str(std::str::from_utf8(&digits).map_err(|_| fmt::Error)?)
}

/// Where `serve` writes its log lines: stderr, in batches on the serving threads.
///
/// A serving thread (see [`batch_this_thread`]) collects its lines in a buffer of its own and
/// writes them to stderr in one `write` when [`BATCH_BYTES`] have collected, when its
/// [`BATCH_INTERVAL`] tick calls [`flush_batch`], and when it ends; so a line reaches stderr
/// at most [`BATCH_INTERVAL`] after it was logged, and no line is lost at exit. Every other
/// thread writes each line at once. No thread ever waits for or wakes another to log (a
/// background writer thread woke for nearly every request line, which cost more than
/// formatting it).
#[derive(Debug, Clone, Copy, Default)]
pub struct LineSink;

/// What a serving thread collects before it writes.
pub const BATCH_BYTES: usize = 32 * 1024;

/// How often a serving thread writes out what it has collected.
pub const BATCH_INTERVAL: Duration = Duration::from_millis(100);

thread_local! {
    /// The lines collected by this thread; `None` on threads that write each line at once.
    static BATCH: RefCell<Option<Vec<u8>>> = const { RefCell::new(None) };
}

/// Makes the calling thread collect its log lines (see [`LineSink`]) until the returned guard
/// is dropped, which writes out what is left (also when the thread unwinds).
#[must_use = "dropping the guard ends batching"]
pub fn batch_this_thread() -> BatchGuard {
    BATCH.with(|b| *b.borrow_mut() = Some(Vec::with_capacity(BATCH_BYTES + 4096)));
    BatchGuard(())
}

/// Writes out the lines the calling thread has collected.
pub fn flush_batch() {
    BATCH.with(|b| {
        if let Ok(mut b) = b.try_borrow_mut() {
            if let Some(buf) = b.as_mut() {
                write_out(buf);
            }
        }
    });
}

/// Ends [`batch_this_thread`]; see there.
#[derive(Debug)]
pub struct BatchGuard(());

impl Drop for BatchGuard {
    fn drop(&mut self) {
        flush_batch();
        BATCH.with(|b| {
            if let Ok(mut b) = b.try_borrow_mut() {
                *b = None;
            }
        });
    }
}

fn write_out(buf: &mut Vec<u8>) {
    if !buf.is_empty() {
        // Nowhere to report a failed write to stderr.
        let _ = io::stderr().lock().write_all(buf);
        buf.clear();
    }
}

impl<'a> MakeWriter<'a> for LineSink {
    type Writer = LineSink;

    fn make_writer(&'a self) -> Self::Writer {
        LineSink
    }
}

impl io::Write for LineSink {
    fn write(&mut self, line: &[u8]) -> io::Result<usize> {
        let collected = BATCH.with(|b| {
            let Ok(mut b) = b.try_borrow_mut() else {
                return false;
            };
            let Some(buf) = b.as_mut() else {
                return false;
            };
            buf.extend_from_slice(line);
            if buf.len() >= BATCH_BYTES {
                write_out(buf);
            }
            true
        });
        if !collected {
            io::stderr().lock().write_all(line)?;
        }
        Ok(line.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Set once `serve`'s text logging is installed: [`LineFormat`] and [`LineFields`] writing
/// to [`LineSink`]. Only then may [`RequestLine::write_direct`] write what they would write.
static DIRECT: AtomicBool = AtomicBool::new(false);

/// Lets [`RequestLine::write_direct`] write lines itself; called by
/// [`crate::cli::init_buffered_logging`] after it installed the text formatter of this module.
pub(crate) fn enable_direct_lines() {
    DIRECT.store(true, Ordering::Relaxed);
}

/// The target [`RequestLine`] is logged under: the gateway's module, as when the gateway
/// logged it itself (`RUST_LOG` filters keep working).
pub const REQUEST_TARGET: &str = "taler_paywall::gateway";

/// The one `info` line every answered request is logged with (the access log).
///
/// Its text is exactly what `info!(id = %id, peer = %peer, method = %method, path = %path,
/// protected, status, bytes, ms, "request")` writes through [`LineFormat`] and
/// [`LineFields`] (a unit test compares the two), but `RequestLine::write_direct` writes it
/// straight into the thread's batch, without `tracing`'s field visitors and `fmt` machinery;
/// that was a tenth of the instructions of a proxied request. `ms` is the time in whole
/// microseconds, written as a decimal number of milliseconds (`0.25`, `12.0`).
#[derive(Debug, Clone, Copy)]
pub struct RequestLine<'a> {
    /// The request id.
    pub id: &'a str,
    /// The peer address (`ip:port`).
    pub peer: &'a str,
    /// The request method.
    pub method: &'a str,
    /// The normalised path, or `-`.
    pub path: &'a str,
    /// Whether a protected prefix matched.
    pub protected: bool,
    /// The response status.
    pub status: u16,
    /// The response body length when known (left out otherwise, as `tracing` leaves out a
    /// `None` field).
    pub bytes: Option<u64>,
    /// Time to the response head, in microseconds.
    pub micros: u64,
}

impl RequestLine<'_> {
    /// The `ms` field's value as `tracing` receives it.
    pub fn ms(&self) -> f64 {
        // Exact for any duration a request can take (below 2^53 microseconds).
        self.micros as f64 / 1000.0
    }

    /// Logs the line at `info` if [`REQUEST_TARGET`] logs at `info`: directly when it can (see
    /// `Self::write_direct`), else through `tracing`, with the same text either way.
    pub fn log(&self) {
        if tracing::enabled!(target: REQUEST_TARGET, Level::INFO) && !self.write_direct() {
            self.trace();
        }
    }

    /// The line as a `tracing` event.
    fn trace(&self) {
        tracing::info!(
            target: REQUEST_TARGET,
            id = %self.id,
            peer = %self.peer,
            method = %self.method,
            path = %self.path,
            protected = self.protected,
            status = self.status,
            bytes = self.bytes,
            ms = self.ms(),
            "request"
        );
    }

    /// Writes the line when `serve`'s text logging is installed and no span is entered (a
    /// span would show in the line); returns false otherwise.
    fn write_direct(&self) -> bool {
        if !DIRECT.load(Ordering::Relaxed)
            || tracing::dispatcher::get_default(|d| d.current_span().id().is_some())
        {
            return false;
        }
        BATCH.with(|b| match b.try_borrow_mut().as_deref_mut() {
            Ok(Some(buf)) => {
                self.write_line(buf, true);
                if buf.len() >= BATCH_BYTES {
                    write_out(buf);
                }
            }
            _ => {
                let mut buf = Vec::with_capacity(256);
                self.write_line(&mut buf, true);
                write_out(&mut buf);
            }
        });
        true
    }

    /// Appends the line, with the time when `time` is set.
    fn write_line(&self, out: &mut Vec<u8>, time: bool) {
        let mut w = ByteWriter(out);
        // Writing to a `Vec` cannot fail.
        let _ = self.write_fields(&mut w, time);
    }

    fn write_fields(&self, w: &mut ByteWriter<'_>, time: bool) -> fmt::Result {
        if time {
            write_now(w)?;
            w.write_char(' ')?;
        }
        w.write_str(" INFO ")?;
        w.write_str(REQUEST_TARGET)?;
        w.write_str(": request id=")?;
        Escaping(&mut *w).write_str(self.id)?;
        w.write_str(" peer=")?;
        Escaping(&mut *w).write_str(self.peer)?;
        w.write_str(" method=")?;
        Escaping(&mut *w).write_str(self.method)?;
        w.write_str(" path=")?;
        Escaping(&mut *w).write_str(self.path)?;
        w.write_str(if self.protected {
            " protected=true status="
        } else {
            " protected=false status="
        })?;
        w.write_str(itoa::Buffer::new().format(self.status))?;
        if let Some(bytes) = self.bytes {
            w.write_str(" bytes=")?;
            w.write_str(itoa::Buffer::new().format(bytes))?;
        }
        w.write_str(" ms=")?;
        write_millis(w, self.micros)?;
        w.write_char('\n')
    }
}

/// Microseconds as `f64`'s `Debug` writes them in milliseconds: `0.001`, `0.25`, `12.0`.
fn write_millis(w: &mut impl fmt::Write, micros: u64) -> fmt::Result {
    // `Debug` switches to exponents from 1e16; far beyond any request's duration.
    if micros >= 1_000_000_000_000_000 {
        return write!(w, "{:?}", micros as f64 / 1000.0);
    }
    w.write_str(itoa::Buffer::new().format(micros / 1000))?;
    let frac = micros % 1000;
    let digits = [
        b'.',
        b'0' + (frac / 100) as u8,
        b'0' + (frac / 10 % 10) as u8,
        b'0' + (frac % 10) as u8,
    ];
    let keep = if frac.is_multiple_of(100) {
        2
    } else if frac.is_multiple_of(10) {
        3
    } else {
        4
    };
    w.write_str(std::str::from_utf8(&digits[..keep]).map_err(|_| fmt::Error)?)
}

/// `fmt::Write` into bytes.
struct ByteWriter<'a>(&'a mut Vec<u8>);

impl fmt::Write for ByteWriter<'_> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        self.0.extend_from_slice(s.as_bytes());
        Ok(())
    }
}

/// The field formatter; see the module documentation.
#[derive(Debug, Clone, Copy, Default)]
pub struct LineFields;

impl<'w> FormatFields<'w> for LineFields {
    fn format_fields<R: RecordFields>(&self, writer: Writer<'w>, fields: R) -> fmt::Result {
        let mut visitor = LineVisitor {
            writer,
            first: true,
            result: Ok(()),
        };
        fields.record(&mut visitor);
        visitor.result
    }
}

struct LineVisitor<'w> {
    writer: Writer<'w>,
    first: bool,
    result: fmt::Result,
}

impl LineVisitor<'_> {
    /// Writes the separator and `name=` (nothing but the separator for `message`); false if
    /// the field is skipped.
    fn start(&mut self, field: &Field) -> bool {
        if self.result.is_err() {
            return false;
        }
        let name = field.name();
        if name.starts_with("log.") {
            // Metadata of events that came from the `log` crate, already shown.
            return false;
        }
        let name = name.strip_prefix("r#").unwrap_or(name);
        let mut r = Ok(());
        if !self.first {
            r = self.writer.write_char(' ');
        }
        self.first = false;
        if name != "message" {
            r = r
                .and_then(|()| self.writer.write_str(name))
                .and_then(|()| self.writer.write_char('='));
        }
        self.result = r;
        r.is_ok()
    }
}

impl Visit for LineVisitor<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        if self.start(field) {
            self.result = if field.name() == "message" {
                Escaping(&mut self.writer).write_str(value)
            } else {
                // `Debug` quotes and escapes.
                write!(self.writer, "{value:?}")
            };
        }
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        if self.start(field) {
            self.result = self.writer.write_str(if value { "true" } else { "false" });
        }
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        if self.start(field) {
            self.result = self.writer.write_str(itoa::Buffer::new().format(value));
        }
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        if self.start(field) {
            self.result = self.writer.write_str(itoa::Buffer::new().format(value));
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        if self.start(field) {
            self.result = write!(Escaping(&mut self.writer), "{value:?}");
        }
    }
}

/// Passes text through, with control characters (C0 but none, DEL, C1) written as escapes.
struct Escaping<'a, W: fmt::Write>(&'a mut W);

impl<W: fmt::Write> fmt::Write for Escaping<'_, W> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        // Printable ASCII, the usual case, is checked without branching per byte (so the
        // check is vectorised).
        if !s
            .bytes()
            .fold(false, |odd, b| odd | !matches!(b, 0x20..=0x7e))
        {
            return self.0.write_str(s);
        }
        let plain = |c: char| !c.is_control();
        if s.chars().all(plain) {
            return self.0.write_str(s);
        }
        for c in s.chars() {
            if plain(c) {
                self.0.write_char(c)?;
            } else {
                write!(self.0, "{}", c.escape_default())?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Buf(Arc<Mutex<Vec<u8>>>);

    impl io::Write for Buf {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    /// The lines the two formatters write for the same events (no time, no colours).
    fn both(log: impl Fn()) -> (String, String) {
        let default = Buf::default();
        let ours = Buf::default();
        let d = default.clone();
        let sub = tracing_subscriber::fmt()
            .without_time()
            .with_ansi(false)
            .with_writer(move || d.clone())
            .finish();
        tracing::subscriber::with_default(sub, &log);
        let o = ours.clone();
        let sub = tracing_subscriber::fmt()
            .with_ansi(false)
            .fmt_fields(LineFields)
            .event_format(LineFormat::without_time())
            .with_writer(move || o.clone())
            .finish();
        tracing::subscriber::with_default(sub, &log);
        let text = |b: Buf| String::from_utf8(b.0.lock().unwrap().clone()).unwrap();
        (text(default), text(ours))
    }

    #[test]
    fn writes_what_the_default_formatter_writes() {
        let peer: std::net::SocketAddr = "127.0.0.1:4242".parse().unwrap();
        let (default, ours) = both(|| {
            let span = tracing::info_span!("request", id = %"0a1b");
            let _e = span.enter();
            tracing::info!(
                id = %"0a1b",
                peer = %peer,
                method = %http::Method::GET,
                path = "/premium/a b",
                protected = true,
                status = 200u16,
                bytes = Some(3043u64),
                missing = None::<u64>,
                delta = -5i64,
                ms = 1.25f64,
                kind = ?Some("x"),
                "request"
            );
            tracing::warn!(r#type = "x", "merchant said {}", 502);
            drop(_e);
            let outer = tracing::info_span!("outer", n = 1);
            let _o = outer.enter();
            tracing::info_span!("empty")
                .in_scope(|| tracing::error!(target: "elsewhere", ok = false));
            tracing::debug!("not shown at the default level");
        });
        assert_eq!(default.lines().count(), 3, "{default}");
        assert!(default.contains("status=200"), "{default}");
        assert_eq!(ours, default);
    }

    #[test]
    fn the_time_is_rfc3339_utc_with_microseconds() {
        let mut s = String::new();
        write_second(&mut s, 1_795_714_801).unwrap();
        assert_eq!(s, "2026-11-26T17:40:01");
        write_second(&mut s, 0).unwrap();
        assert_eq!(&s[19..], "1970-01-01T00:00:00");
        let mut line = String::new();
        write_micros(&mut Writer::new(&mut line), 4_567).unwrap();
        assert_eq!(line, ".004567");
        let mut line = String::new();
        write_now(&mut Writer::new(&mut line)).unwrap();
        let shape = line
            .bytes()
            .map(|b| if b.is_ascii_digit() { b'9' } else { b })
            .collect::<Vec<u8>>();
        assert_eq!(shape, b"9999-99-99T99:99:99.999999Z", "{line}");
        assert!(line.starts_with("20"), "{line}");
    }

    #[test]
    fn the_direct_request_line_is_the_formatters_line() {
        let lines = [
            RequestLine {
                id: "0a1b2c",
                peer: "127.0.0.1:4242",
                method: "GET",
                path: "/premium/a%20b",
                protected: true,
                status: 200,
                bytes: Some(3043),
                micros: 250,
            },
            RequestLine {
                id: "trusted\ttoken",
                peer: "[::1]:1",
                method: "PROPFIND",
                path: "/caf\u{e9}\u{9b}",
                protected: false,
                status: 502,
                bytes: None,
                micros: 12_000_000,
            },
            RequestLine {
                id: "-",
                peer: "10.0.0.1:9",
                method: "HEAD",
                path: "-",
                protected: false,
                status: 304,
                bytes: Some(0),
                micros: 0,
            },
        ];
        for line in lines {
            let (_, ours) = both(|| line.trace());
            let mut direct = Vec::new();
            line.write_line(&mut direct, false);
            assert_eq!(String::from_utf8(direct).unwrap(), ours);
        }
        // With the time, the line starts as the formatter's does.
        let mut direct = Vec::new();
        lines[0].write_line(&mut direct, true);
        let text = String::from_utf8(direct).unwrap();
        assert_eq!(
            &text[27..],
            "  INFO taler_paywall::gateway: request id=0a1b2c peer=127.0.0.1:4242 method=GET \
             path=/premium/a%20b protected=true status=200 bytes=3043 ms=0.25\n"
        );
    }

    #[test]
    fn milliseconds_are_written_as_f64_debug_writes_them() {
        let mut values: Vec<u64> = (0..20_000).collect();
        values.extend([
            123_456,
            1_000_000,
            999_999_999,
            86_400_000_000,
            999_999_999_999_999,
            1_000_000_000_000_000,
            u64::MAX,
        ]);
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for _ in 0..20_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            values.push(x % 10_000_000_000_000);
        }
        for micros in values {
            let mut ours = String::new();
            write_millis(&mut ours, micros).unwrap();
            assert_eq!(ours, format!("{:?}", micros as f64 / 1000.0), "{micros}");
        }
    }

    #[test]
    fn control_characters_never_reach_the_line() {
        let (_, ours) = both(|| {
            tracing::info!(cause = %"bad\nINFO forged\u{1b}[31m", "a\rb {}", "\u{9b}x");
        });
        assert_eq!(ours.lines().count(), 1, "{ours}");
        assert!(!ours.contains('\u{1b}') && !ours.contains('\r') && !ours.contains('\u{9b}'));
        assert!(ours.contains(r"cause=bad\nINFO forged\u{1b}[31m"), "{ours}");
        assert!(ours.contains(r"a\rb \u{9b}x"), "{ours}");
    }
}
