//! Checks on the repository's own text: clippy is told to make every
//! `unsafe` say why it is sound, and the documentation and comments cite only
//! files that are in the repository.

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

/// The settings under `header` (e.g. `[lints]`) in Cargo.toml `text`: its
/// lines up to the next header, trimmed, without blanks and comments.
fn toml_section<'a>(text: &'a str, header: &str) -> Vec<&'a str> {
    text.lines()
        .map(str::trim)
        .skip_while(|l| *l != header)
        .skip(1)
        .take_while(|l| !l.starts_with('['))
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect()
}

#[test]
fn the_toml_section_reader_stops_at_the_next_header() {
    let text = "[a]\nx = 1\n\n# note\n[b]\ny = 2\n";
    assert_eq!(toml_section(text, "[a]"), vec!["x = 1"]);
    assert_eq!(toml_section(text, "[b]"), vec!["y = 2"]);
    assert!(toml_section(text, "[c]").is_empty());
}

/// Clippy's `undocumented_unsafe_blocks`, denied for the whole workspace,
/// is what makes every `unsafe` block and impl say why it is sound in a
/// `// SAFETY:` comment directly above it: dropping the lint, or a member
/// not taking the workspace's lints, fails here.
#[test]
fn clippy_denies_unsafe_without_a_safety_comment() {
    let root = root();
    let manifest = fs::read_to_string(root.join("Cargo.toml")).unwrap();
    assert!(
        toml_section(&manifest, "[workspace.lints.clippy]")
            .contains(&r#"undocumented_unsafe_blocks = "deny""#),
        "Cargo.toml's [workspace.lints.clippy] must deny undocumented_unsafe_blocks"
    );
    let members: Vec<&str> = toml_section(&manifest, "[workspace]")
        .into_iter()
        .find_map(|l| l.strip_prefix("members = "))
        .expect("a members list in [workspace]")
        .split('"')
        .skip(1)
        .step_by(2)
        .collect();
    assert!(members.len() >= 2, "members: {members:?}");
    for member in members {
        let path = root.join(member).join("Cargo.toml");
        let text = fs::read_to_string(&path).unwrap();
        assert!(
            toml_section(&text, "[lints]").contains(&"workspace = true"),
            "{} must take the workspace's lints ([lints] workspace = true)",
            path.display()
        );
    }
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
