//! Checks on the repository's own text: every `unsafe` says why it is sound,
//! and the documentation and comments cite only files that are in the
//! repository.

use std::fs;
use std::path::{Path, PathBuf};

/// The workspace root (the flexnbd package is at the top of it).
fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Every file under `dir` (recursively) whose name ends with one of `exts`
/// (every file when `exts` is empty), skipping build output, git's own
/// files and benchmark results.
fn files_under(dir: &Path, exts: &[&str]) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = fs::read_dir(&d) else {
            continue;
        };
        for entry in entries {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            if path.is_dir() {
                if !matches!(name.as_str(), "target" | ".git" | "out") {
                    stack.push(path);
                }
            } else if exts.is_empty() || exts.iter().any(|e| name.ends_with(e)) {
                out.push(path);
            }
        }
    }
    out.sort();
    out
}

/// The 1-based line of every `unsafe` keyword in Rust source `text`: code
/// only, not comments, strings or character literals.
fn unsafe_keyword_lines(text: &str) -> Vec<usize> {
    let b = text.as_bytes();
    let mut lines = Vec::new();
    let mut line = 1;
    let mut i = 0;
    // Counts newlines in b[from..to].
    let newlines = |from: usize, to: usize| b[from..to].iter().filter(|&&c| c == b'\n').count();
    while i < b.len() {
        let c = b[i];
        if c == b'\n' {
            line += 1;
            i += 1;
        } else if b[i..].starts_with(b"//") {
            while i < b.len() && b[i] != b'\n' {
                i += 1;
            }
        } else if b[i..].starts_with(b"/*") {
            // Block comments nest in Rust.
            let start = i;
            let mut depth = 0;
            while i < b.len() {
                if b[i..].starts_with(b"/*") {
                    depth += 1;
                    i += 2;
                } else if b[i..].starts_with(b"*/") {
                    depth -= 1;
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    i += 1;
                }
            }
            line += newlines(start, i);
        } else if c == b'r' && (b.get(i + 1) == Some(&b'"') || b.get(i + 1) == Some(&b'#')) {
            // A raw string, r"..." or r#"..."#; `r#ident` is a raw identifier.
            let mut j = i + 1;
            while b.get(j) == Some(&b'#') {
                j += 1;
            }
            if b.get(j) != Some(&b'"') {
                i = j;
                continue;
            }
            let mut close = vec![b'"'];
            close.extend(std::iter::repeat_n(b'#', j - i - 1));
            let start = i;
            i = j + 1;
            while i < b.len() && !b[i..].starts_with(&close) {
                i += 1;
            }
            i = (i + close.len()).min(b.len());
            line += newlines(start, i);
        } else if c == b'"' {
            let start = i;
            i += 1;
            while i < b.len() && b[i] != b'"' {
                i += if b[i] == b'\\' { 2 } else { 1 };
            }
            i = (i + 1).min(b.len());
            line += newlines(start, i.min(b.len()));
        } else if c == b'\'' {
            // A character literal ('x', '\n', '"') or a lifetime ('a).
            if b.get(i + 1) == Some(&b'\\') {
                // Past the quote, the backslash and the escaped character.
                i += 3;
                while i < b.len() && b[i] != b'\'' {
                    i += 1;
                }
                i += 1;
            } else if b.get(i + 2) == Some(&b'\'') {
                i += 3;
            } else {
                i += 1;
            }
        } else if c.is_ascii_alphabetic() || c == b'_' {
            let start = i;
            while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'_') {
                i += 1;
            }
            if &b[start..i] == b"unsafe" {
                lines.push(line);
            }
        } else {
            i += 1;
        }
    }
    lines
}

/// The `unsafe` keywords in `text` whose line has no `SAFETY:` comment
/// directly above it (in the run of `//` lines that ends on the line before).
fn unjustified_unsafe(text: &str) -> Vec<usize> {
    let all: Vec<&str> = text.lines().collect();
    unsafe_keyword_lines(text)
        .into_iter()
        .filter(|&n| {
            let justified = all[..n - 1]
                .iter()
                .rev()
                .map(|l| l.trim_start())
                .take_while(|l| l.starts_with("//"))
                .any(|l| l.contains("SAFETY:"));
            !justified
        })
        .collect()
}

#[test]
fn the_unsafe_scanner_finds_code_and_skips_comments_and_strings() {
    let text = r##"
fn a() {
    // SAFETY: says why.
    unsafe { x() };
    let s = "unsafe { in a string }";
    let r = r#"unsafe { in a raw "string" }"#;
    let c = '"'; let e = '\''; let l: &'static str = "";
    /* unsafe { in a /* nested */ block comment } */
    // unsafe in a line comment
    let y = unsafe { z() };
}
// SAFETY: one comment per impl.
unsafe impl Send for T {}
unsafe impl Sync for T {}
"##;
    assert_eq!(unsafe_keyword_lines(text), vec![4, 10, 13, 14]);
    assert_eq!(unjustified_unsafe(text), vec![10, 14]);
}

#[test]
fn every_unsafe_has_a_safety_comment_directly_above() {
    let root = root();
    let mut scanned = 0;
    let mut found = 0;
    let mut offenders = Vec::new();
    for path in files_under(&root, &[".rs"]) {
        let text = fs::read_to_string(&path).unwrap();
        scanned += 1;
        found += unsafe_keyword_lines(&text).len();
        for n in unjustified_unsafe(&text) {
            let shown = path.strip_prefix(&root).unwrap().display();
            offenders.push(format!(
                "{shown}:{n}: {}",
                text.lines().nth(n - 1).unwrap().trim()
            ));
        }
    }
    assert!(
        scanned > 40,
        "only {scanned} Rust files under {}",
        root.display()
    );
    assert!(found > 0, "no unsafe found at all: is the scanner broken?");
    assert!(
        offenders.is_empty(),
        "put a `// SAFETY:` comment saying why it is sound directly above:\n{}",
        offenders.join("\n")
    );
}

/// Ways of citing a document that lives outside the repository: design notes
/// and specifications beside a checkout are not there for a reader of the
/// code, so the contract and the behaviour are described under docs/ or
/// where they are relied on.
const OUTSIDE: &[&str] = &[
    "design/handoff.md",
    "design/benchmarks.md",
    "design/architecture.md",
    "../shared",
    "shared/design",
    "shared/spec",
    "flexnbd-behaviour",
];

/// Every text file of the repository with its contents, except this file
/// (whose needles would match themselves).
fn repository_text() -> Vec<(String, String)> {
    let root = root();
    files_under(&root, &[])
        .into_iter()
        .filter(|p| !p.ends_with("acceptance/hygiene.rs"))
        .filter_map(|p| {
            let text = fs::read_to_string(&p).ok()?;
            Some((p.strip_prefix(&root).unwrap().display().to_string(), text))
        })
        .collect()
}

/// Section numbers of a specification ("spec 3.11", "spec section 7").
fn cites_spec_section(line: &str) -> bool {
    let lower = line.to_lowercase();
    lower.match_indices("spec ").any(|(at, m)| {
        let rest = &lower[at + m.len()..];
        let rest = rest.strip_prefix("section ").unwrap_or(rest);
        let rest = rest.strip_prefix("sections ").unwrap_or(rest);
        rest.starts_with(|c: char| c.is_ascii_digit())
    })
}

#[test]
fn the_spec_section_check_sees_section_numbers_only() {
    assert!(cites_spec_section("as in spec 3.11, the"));
    assert!(cites_spec_section("(Spec sections 1.10, 3.2)"));
    assert!(cites_spec_section("x (spec section 7)"));
    assert!(!cites_spec_section("the spec asks for <= 2^20"));
    assert!(!cites_spec_section("spec.key, act"));
}

#[test]
fn nothing_cites_a_document_outside_the_repository() {
    let files = repository_text();
    assert!(files.len() > 60, "only {} text files found", files.len());
    let mut offenders = Vec::new();
    for (path, text) in &files {
        for (n, line) in text.lines().enumerate() {
            if OUTSIDE.iter().any(|o| line.contains(o)) || cites_spec_section(line) {
                offenders.push(format!("{path}:{}: {}", n + 1, line.trim()));
            }
        }
    }
    assert!(
        offenders.is_empty(),
        "cite docs/ (or say it where it is relied on) instead:\n{}",
        offenders.join("\n")
    );
}

#[test]
fn every_cited_doc_exists() {
    let root = root();
    let mut missing = Vec::new();
    let mut cited = 0;
    for (path, text) in repository_text() {
        for (at, _) in text.match_indices("docs/") {
            let name: String = text[at + "docs/".len()..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
                .collect();
            // A sentence may end right after the name.
            let name = name.trim_end_matches('.');
            if !name.ends_with(".md") {
                continue;
            }
            cited += 1;
            if !root.join("docs").join(name).is_file() {
                missing.push(format!("{path}: docs/{name}"));
            }
        }
    }
    assert!(
        cited > 0,
        "nothing cites docs/ at all: is the check broken?"
    );
    assert!(
        missing.is_empty(),
        "cited but missing:\n{}",
        missing.join("\n")
    );
}
