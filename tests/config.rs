//! `taler-paywall check` as operators and scripts run it: the real binary on real files.
//!
//! The unit tests in `src/config.rs` cover each validation rule; these make sure the command
//! line keeps the pinned contract (exit 0/1, `FILE:LINE: message` on stderr, the
//! `TALER_PAYWALL_*` variables), that the shipped example files pass, that the example and
//! `docs/configuration.md` name every key the parser knows, and that no secret ever reaches
//! the terminal.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const BIN: &str = env!("CARGO_BIN_EXE_taler-paywall");

/// Distinctive secrets: finding one of these in any output means it leaked.
const TOKEN: &str = "secret-token:TOKEN-itest-d1st1nct1ve-41c7";
const SECRET: &str = "SECRET-itest-d1st1nct1ve-0123456789abcdef-88e1";
const ENV_TOKEN: &str = "secret-token:ENVTOKEN-itest-d1st1nct1ve-2b90";
const ENV_SECRET: &str = "ENVSECRET-itest-d1st1nct1ve-0123456789abcdef-d3f5";
const LEAK_MARKERS: [&str; 4] = [
    "TOKEN-itest-d1st1nct1ve",
    "SECRET-itest-d1st1nct1ve",
    "ENVTOKEN-itest-d1st1nct1ve",
    "ENVSECRET-itest-d1st1nct1ve",
];

const VALID: &str = r#"[server]
listen = "127.0.0.1:8080"
public_url = "https://shop.example"

[origin]
url = "http://127.0.0.1:8000"

[merchant]
url = "http://127.0.0.1:9966/"
token = "secret-token:TOKEN-itest-d1st1nct1ve-41c7"

[session]
secret = "SECRET-itest-d1st1nct1ve-0123456789abcdef-88e1"

[[protect]]
prefix = "/premium/"
price = "KUDOS:1.5"
summary = "Premium article"
"#;

fn repo_file(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

/// Runs the binary with a clean `TALER_PAYWALL_*` environment plus `env`, and checks that
/// nothing it printed contains a secret.
fn run(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(BIN);
    cmd.args(args)
        .env_remove("TALER_PAYWALL_CONFIG")
        .env_remove("TALER_PAYWALL_MERCHANT_TOKEN")
        .env_remove("TALER_PAYWALL_SESSION_SECRET")
        .env("RUST_LOG", "debug");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("run taler-paywall");
    for stream in [&out.stdout, &out.stderr] {
        let text = String::from_utf8_lossy(stream);
        for marker in LEAK_MARKERS {
            assert!(
                !text.contains(marker),
                "`taler-paywall {}` printed a secret ({marker}):\n{text}",
                args.join(" ")
            );
        }
    }
    out
}

fn check(path: &Path) -> Output {
    run(&["check", "--config", path.to_str().unwrap()], &[])
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A file named `gateway.toml` with `text` in a fresh directory (kept alive by the guard).
fn config_file(text: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gateway.toml");
    std::fs::write(&path, text).unwrap();
    (dir, path)
}

/// 1-based number of the only line of `text` containing `needle`.
fn line_with(text: &str, needle: &str) -> usize {
    let hits: Vec<usize> = text
        .lines()
        .enumerate()
        .filter(|(_, l)| l.contains(needle))
        .map(|(i, _)| i + 1)
        .collect();
    assert_eq!(hits.len(), 1, "{needle:?} must be on exactly one line");
    hits[0]
}

fn replace(text: &str, from: &str, to: &str) -> String {
    assert_eq!(text.matches(from).count(), 1, "{from:?}");
    text.replace(from, to)
}

/// Asserts exit status 1 and that stderr holds, for each `(needle, words)`, a line
/// `PATH:LINE: ...words...` where LINE is the line of `text` containing `needle`.
/// Returns the number of problem lines printed.
fn assert_reported(out: &Output, path: &Path, text: &str, want: &[(&str, &str)]) -> usize {
    let err = stderr(out);
    assert_eq!(out.status.code(), Some(1), "stderr:\n{err}");
    for (needle, words) in want {
        let prefix = format!("{}:{}: ", path.display(), line_with(text, needle));
        assert!(
            err.lines()
                .any(|l| l.starts_with(&prefix) && l.contains(words)),
            "expected a line starting {prefix:?} containing {words:?}; stderr:\n{err}"
        );
    }
    err.lines().count()
}

// -- the shipped files ---------------------------------------------------------------------------

#[test]
fn the_example_config_passes_check_as_shipped() {
    let example = repo_file("gateway.toml.example");
    let out = check(&example);
    assert!(out.status.success(), "stderr:\n{}", stderr(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("gateway.toml.example: OK"), "{stdout}");
    assert!(out.stderr.is_empty(), "{}", stderr(&out));
}

/// Uncommenting every `#key = value` line of the example must give a file whose only problems
/// are the placeholder files that do not exist here and the alternatives set together: no key
/// in the example is misspelt or stale.
#[test]
fn every_commented_key_of_the_example_is_a_real_key() {
    let example = std::fs::read_to_string(repo_file("gateway.toml.example")).unwrap();
    let uncommented: String = example
        .lines()
        .map(|l| match l.strip_prefix('#') {
            Some(rest)
                if rest.starts_with('[')
                    || rest.split_once(" = ").is_some_and(|(k, _)| {
                        !k.is_empty() && k.bytes().all(|b| b.is_ascii_lowercase() || b == b'_')
                    }) =>
            {
                rest
            }
            _ => l,
        })
        .collect::<Vec<_>>()
        .join("\n");
    let (_dir, path) = config_file(&uncommented);
    let out = check(&path);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    let expected = ["cannot read", "not both", "is not a directory"];
    for line in err.lines() {
        assert!(
            expected.iter().any(|e| line.contains(e)),
            "unexpected problem in the uncommented example: {line}"
        );
    }
    // tls cert/key, origin/merchant ca, token+token_file, secret+secret_file, pages.dir.
    assert_eq!(err.lines().count(), 7, "{err}");
}

/// The keys the parser accepts in `table`, read from its own "unknown field" message.
fn known_keys(table: &str) -> BTreeSet<String> {
    let text = if table.is_empty() {
        format!("zz_unknown = 1\n{VALID}")
    } else {
        let with_tables = format!(
            "{VALID}\n[server.tls]\ncert_file = \"c\"\nkey_file = \"k\"\n\n[admin]\nlisten = \"127.0.0.1:9090\"\n\n[limits]\n\n[pages]\n\n[forward_auth]\n"
        );
        replace(
            &with_tables,
            &format!("{table}\n"),
            &format!("{table}\nzz_unknown = 1\n"),
        )
    };
    let (_dir, path) = config_file(&text);
    let err = stderr(&check(&path));
    let list = err
        .split_once("expected one of ")
        .or_else(|| err.split_once("expected "))
        .unwrap_or_else(|| panic!("{table}: no list of keys in: {err}"))
        .1;
    list.split('`')
        .skip(1)
        .step_by(2)
        .map(str::to_owned)
        .collect()
}

/// A key added to the parser without a line in the example and a row in the reference fails
/// here, and the message says which.
#[test]
fn the_example_and_the_reference_document_every_key() {
    let example = std::fs::read_to_string(repo_file("gateway.toml.example")).unwrap();
    let reference = std::fs::read_to_string(repo_file("docs/configuration.md")).unwrap();
    let tables = [
        ("", ""),
        ("[server]", "server"),
        ("[server.tls]", "server.tls"),
        ("[origin]", "origin"),
        ("[merchant]", "merchant"),
        ("[session]", "session"),
        ("[[protect]]", "protect"),
        ("[admin]", "admin"),
        ("[limits]", "limits"),
        ("[pages]", "pages"),
        ("[forward_auth]", "forward_auth"),
    ];
    let top = known_keys("");
    let named: BTreeSet<String> = tables[1..]
        .iter()
        .filter(|(_, n)| !n.contains('.'))
        .map(|(_, n)| (*n).to_owned())
        .collect();
    assert_eq!(
        top, named,
        "top-level tables changed: add them to the example, docs/configuration.md and this test"
    );
    for (header, name) in &tables[1..] {
        let keys = known_keys(header);
        assert!(!keys.is_empty(), "{header}: no keys read");
        for key in keys {
            if name == &"server" && key == "tls" {
                continue;
            }
            let in_example = example.lines().any(|l| {
                let l = l.trim_start_matches('#');
                l.starts_with(&format!("{key} =")) || l.starts_with(&format!("{key}="))
            });
            assert!(
                in_example,
                "gateway.toml.example does not show {name}.{key}"
            );
            assert!(
                reference.contains(&format!("| `{key}` |")),
                "docs/configuration.md has no row for {name}.{key}"
            );
        }
        assert!(
            example.contains(header),
            "gateway.toml.example has no {header}"
        );
        assert!(
            reference.contains(&format!("`{header}`")),
            "docs/configuration.md has no section for {header}"
        );
    }
}

#[test]
fn the_compose_config_passes_check_once_its_secrets_are_in_the_environment() {
    let compose = repo_file("deploy/compose/gateway.toml");
    let path = compose.to_str().unwrap();
    let out = run(
        &["check", "--config", path],
        &[
            ("TALER_PAYWALL_MERCHANT_TOKEN", ENV_TOKEN),
            ("TALER_PAYWALL_SESSION_SECRET", ENV_SECRET),
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));

    // Without them, check says how to provide each one.
    let out = run(&["check", "--config", path], &[]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("TALER_PAYWALL_MERCHANT_TOKEN"), "{err}");
    assert!(err.contains("TALER_PAYWALL_SESSION_SECRET"), "{err}");
}

// -- problems: exit 1, FILE:LINE: message ---------------------------------------------------------

#[test]
fn a_valid_file_passes_and_says_how_many_prefixes_it_protects() {
    let (_dir, path) = config_file(VALID);
    let out = check(&path);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("OK (1 protected prefix)"));
}

#[test]
fn an_unknown_key_is_reported_with_file_and_line() {
    let text = replace(VALID, "summary =", "sumary = \"typo\"\nsummary =");
    let (_dir, path) = config_file(&text);
    let n = assert_reported(
        &check(&path),
        &path,
        &text,
        &[("sumary", "unknown field `sumary`")],
    );
    assert_eq!(n, 1);
}

#[test]
fn a_bad_amount_is_reported_with_file_and_line() {
    let text = replace(VALID, "KUDOS:1.5", "KUDOS:1.123456789");
    let (_dir, path) = config_file(&text);
    let n = assert_reported(&check(&path), &path, &text, &[("price =", "protect.price")]);
    assert_eq!(n, 1);
}

#[test]
fn a_short_secret_is_reported_with_file_and_line_but_not_echoed() {
    let text = replace(VALID, SECRET, "SECRET-itest-d1st1nct1ve");
    let (_dir, path) = config_file(&text);
    let n = assert_reported(&check(&path), &path, &text, &[("secret =", "32 bytes")]);
    assert_eq!(n, 1);
}

#[test]
fn a_secret_given_where_a_list_belongs_is_not_echoed() {
    let text = replace(
        VALID,
        "[[protect]]",
        "previous_secrets = \"SECRET-itest-d1st1nct1ve-as-a-string-not-a-list\"\n\n[[protect]]",
    );
    let (_dir, path) = config_file(&text);
    // `run` fails the test if the value appears in the output.
    assert_reported(
        &check(&path),
        &path,
        &text,
        &[("previous_secrets", "invalid type")],
    );
}

#[test]
fn every_problem_of_a_file_is_reported() {
    let text = r#"[server]
listen = "localhost:8080"
public_url = "https://shop.example"

[origin]
url = "ftp://origin.example"

[merchant]
url = "http://127.0.0.1:9966/?instance=x"
token = "secret-token:TOKEN-itest-d1st1nct1ve-41c7"
token_file = "merchant-token"

[session]
secret = "SECRET-itest-d1st1nct1ve"
recheck_interval = "five minutes"

[[protect]]
prefix = "/a/../premium/"
price = "kudos:1"
summary = "Premium"
scope = "site"

[[protect]]
prefix = "/PREMIUM/"
price = "KUDOS:0"
summary = "Again"

[admin]
listen = "127.0.0.1:8080" # admin
"#;
    let (_dir, path) = config_file(text);
    let want = [
        ("localhost:8080", "server.listen"),
        ("ftp://", "origin.url"),
        ("?instance=x", "merchant.url"),
        ("token =", "not both"),
        ("secret =", "32 bytes"),
        ("five minutes", "session.recheck_interval"),
        ("/a/../premium/", "write \"/premium/\""),
        ("kudos:1", "protect.price"),
        ("\"site\"", "protect.scope"),
        ("KUDOS:0", "more than zero"),
    ];
    let n = assert_reported(&check(&path), &path, text, &want);
    assert_eq!(n, want.len(), "{}", stderr(&check(&path)));

    // The duplicate and the admin clash show once the values they compare are valid.
    let text = replace(text, "/a/../premium/", "/premium/");
    let text = replace(&text, "\"localhost:8080\"", "\"127.0.0.1:8080\"");
    let (_dir2, path) = config_file(&text);
    assert_reported(
        &check(&path),
        &path,
        &text,
        &[
            ("/PREMIUM/", "listed twice"),
            ("# admin", "admin.listen must differ"),
        ],
    );
}

#[test]
fn a_missing_file_is_reported_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("no-such-gateway.toml");
    let out = check(&path);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.starts_with(&format!("{}: cannot read", path.display())),
        "{err}"
    );
}

#[test]
fn a_relative_secret_file_is_read_from_the_config_directory() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("token"), format!("{TOKEN}\n")).unwrap();
    let text = replace(
        VALID,
        &format!("token = \"{TOKEN}\""),
        "token_file = \"token\"",
    );
    let path = dir.path().join("gateway.toml");
    std::fs::write(&path, &text).unwrap();
    // Run from elsewhere: the path must not be taken relative to the working directory.
    let out = Command::new(BIN)
        .args(["check", "--config", path.to_str().unwrap()])
        .current_dir("/")
        .env_remove("TALER_PAYWALL_CONFIG")
        .env_remove("TALER_PAYWALL_MERCHANT_TOKEN")
        .env_remove("TALER_PAYWALL_SESSION_SECRET")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));

    std::fs::remove_file(dir.path().join("token")).unwrap();
    let out = check(&path);
    let err = assert_reported(&out, &path, &text, &[("token_file", "cannot read")]);
    assert_eq!(err, 1);
    assert!(stderr(&out).contains(&dir.path().join("token").display().to_string()));
}

// -- the environment -------------------------------------------------------------------------------

#[test]
fn taler_paywall_config_names_the_file_when_config_is_not_given() {
    let example = repo_file("gateway.toml.example");
    let out = run(
        &["check"],
        &[("TALER_PAYWALL_CONFIG", example.to_str().unwrap())],
    );
    assert!(out.status.success(), "{}", stderr(&out));

    let text = replace(VALID, "KUDOS:1.5", "1.5");
    let (_dir, path) = config_file(&text);
    let out = run(
        &["check"],
        &[("TALER_PAYWALL_CONFIG", path.to_str().unwrap())],
    );
    assert_reported(&out, &path, &text, &[("price =", "protect.price")]);

    // --config wins over the variable.
    let out = run(
        &["check", "--config", example.to_str().unwrap()],
        &[("TALER_PAYWALL_CONFIG", path.to_str().unwrap())],
    );
    assert!(out.status.success(), "{}", stderr(&out));
}

#[test]
fn secrets_from_the_environment_override_the_file() {
    // A file whose own values are unusable passes once the environment supplies good ones.
    let text = replace(VALID, TOKEN, "secret-token:has a space");
    let text = replace(&text, SECRET, "short");
    let (_dir, path) = config_file(&text);
    let p = path.to_str().unwrap();
    assert_eq!(run(&["check", "--config", p], &[]).status.code(), Some(1));
    let out = run(
        &["check", "--config", p],
        &[
            ("TALER_PAYWALL_MERCHANT_TOKEN", ENV_TOKEN),
            ("TALER_PAYWALL_SESSION_SECRET", ENV_SECRET),
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));

    // A bad value from the environment is blamed on the variable, and not printed.
    let (_dir2, path) = config_file(VALID);
    let out = run(
        &["check", "--config", path.to_str().unwrap()],
        &[(
            "TALER_PAYWALL_SESSION_SECRET",
            "ENVSECRET-itest-d1st1nct1ve",
        )],
    );
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.starts_with(&format!(
            "{}: TALER_PAYWALL_SESSION_SECRET: session.secret is 27 bytes",
            path.display()
        )),
        "{err}"
    );
}

#[test]
fn serve_refuses_an_invalid_file_before_binding() {
    let text = replace(VALID, "KUDOS:1.5", "KUDOS:0");
    let (_dir, path) = config_file(&text);
    let out = run(&["serve", "--config", path.to_str().unwrap()], &[]);
    assert!(!out.status.success());
    let err = stderr(&out);
    let at = format!("{}:{}:", path.display(), line_with(&text, "price ="));
    assert!(err.contains(&at), "{err}");
}
