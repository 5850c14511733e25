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
//! Used for `--log-format text` when stderr is not a terminal (on a terminal the default,
//! coloured formatter is kept). JSON lines are written by `tracing-subscriber`'s JSON
//! formatter, which escapes by construction.

use std::fmt::{self, Write as _};

use tracing::field::{Field, Visit};
use tracing_subscriber::field::RecordFields;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::FormatFields;

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
            self.result = write!(self.writer, "{value}");
        }
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        if self.start(field) {
            self.result = write!(self.writer, "{value}");
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        if self.start(field) {
            self.result = write!(Escaping(&mut self.writer), "{value:?}");
        }
    }
}

/// Passes text through, with control characters (C0 but none, DEL, C1) written as escapes.
struct Escaping<'a, 'w>(&'a mut Writer<'w>);

impl fmt::Write for Escaping<'_, '_> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let plain = |c: char| !(c.is_control());
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
            .without_time()
            .with_ansi(false)
            .fmt_fields(LineFields)
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
        });
        assert!(default.contains("status=200"), "{default}");
        assert_eq!(ours, default);
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
