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

/// The source of `src/` with each file's unit tests left out: the tests
/// module at the end of a file may use anything (its `static` counters, its
/// fixtures from any layer) without being part of the program.
fn program_sources() -> Vec<(PathBuf, String)> {
    let src = root().join("src");
    files_under(&src, &[".rs"])
        .into_iter()
        .map(|path| {
            let text = fs::read_to_string(&path).unwrap();
            let program = match text.find("#[cfg(test)]\nmod tests") {
                Some(at) => text[..at].to_string(),
                None => text,
            };
            (path, program)
        })
        .collect()
}

/// A line without its `//` comment (and so without doc comments).
fn code_of(line: &str) -> &str {
    match line.find("//") {
        Some(at) => &line[..at],
        None => line,
    }
}

/// The names of the process-wide statics in `text` that can change: a
/// `static` whose type has interior mutability, a `static mut`, or one
/// declared in `thread_local!` or `task_local!`.
fn mutable_statics(text: &str) -> Vec<String> {
    const MUTABLE: [&str; 11] = [
        "OnceLock",
        "OnceCell",
        "LazyLock",
        "Lazy<",
        "Atomic",
        "Mutex",
        "RwLock",
        "Semaphore",
        "Cell<",
        "Notify",
        "Condvar",
    ];
    let mut out = Vec::new();
    let mut in_local_macro = false;
    for line in text.lines().map(code_of) {
        let trimmed = line.trim();
        if trimmed.contains("thread_local!") || trimmed.contains("task_local!") {
            in_local_macro = true;
        }
        let Some(rest) = trimmed
            .split_once("static ")
            .filter(|(before, _)| !before.ends_with('\''))
            .map(|(_, rest)| rest)
        else {
            continue;
        };
        let (mutable_keyword, rest) = match rest.strip_prefix("mut ") {
            Some(rest) => (true, rest),
            None => (false, rest),
        };
        let Some((name, ty)) = rest.split_once(':') else {
            continue;
        };
        if mutable_keyword || in_local_macro || MUTABLE.iter().any(|m| ty.contains(m)) {
            out.push(name.trim().to_string());
        }
        in_local_macro = false;
    }
    out
}

#[test]
fn the_static_finder_sees_every_kind_of_mutable_static() {
    let text = "static A: AtomicU64 = AtomicU64::new(0);\n\
        static B: &str = \"fixed\";\n\
        pub(crate) static C: std::sync::OnceLock<String> = OnceLock::new();\n\
        static mut D: u8 = 0;\n\
        thread_local! {\n    static E: u8 = const { 0 };\n}\n\
        tokio::task_local! {\n    static F: Arc<str>;\n}\n\
        fn f() -> &'static str { \"x\" }\n\
        // static G: Mutex<u8> in a comment\n\
        static H: [u8; 2] = [0, 1];\n";
    assert_eq!(mutable_statics(text), vec!["A", "C", "D", "E", "F"]);
}

/// No process-wide state can change except the log sink: everything else
/// belongs to an instance (its storage stack, its server, its probe), so
/// two instances can run in one process and a simulator can run many.
#[test]
fn no_process_wide_mutable_state_but_the_log_sink() {
    // The level threshold and the default context of log lines; the
    // per-thread and per-task instance tags of log lines.
    let allowed = [
        ("src/log.rs", "THRESHOLD"),
        ("src/log.rs", "DEFAULT_CONTEXT"),
        ("src/log.rs", "THREAD_CONTEXT"),
        ("src/log.rs", "TASK_CONTEXT"),
    ];
    let root = root();
    let mut found = Vec::new();
    let sources = program_sources();
    assert!(
        sources.len() > 30,
        "only {} files under src/",
        sources.len()
    );
    for (path, text) in sources {
        let rel = path
            .strip_prefix(&root)
            .unwrap()
            .to_string_lossy()
            .into_owned();
        for name in mutable_statics(&text) {
            if !allowed.contains(&(rel.as_str(), name.as_str())) {
                found.push(format!("{rel}: static {name}"));
            }
        }
    }
    assert!(
        found.is_empty(),
        "process-wide mutable state outside the log sink (hold it per instance and pass it along):\n{}",
        found.join("\n")
    );
}

/// The layers of `src/`, bottom first, by top-level module (`src/<m>.rs` or
/// `src/<m>/`). A module may use only modules of lower layers; README.md's
/// Layout section shows the same table.
const LAYERS: &[&[&str]] = &[
    &["proto", "log"],
    &["core", "transport", "acl", "signals", "status", "gate"],
    &["tls"],
    &["store"],
    &["power", "handoff"],
    &["probe"],
    &["fault_apply"],
    &["client", "control"],
    &["server"],
    &["mirror", "proxy"],
    &["daemon", "sim", "fuzzing"],
];

/// The crate-root macros and the module that defines them.
const MACROS: [(&str, &str); 6] = [
    ("debug", "log"),
    ("info", "log"),
    ("warn", "log"),
    ("error", "log"),
    ("fatal", "log"),
    ("log_at", "log"),
];

fn layer_of(module: &str) -> Option<usize> {
    LAYERS.iter().position(|layer| layer.contains(&module))
}

/// The top-level modules `text` uses through `crate::` paths, with the path
/// as written: `crate::a::b`, `crate::{a, b::c}`, and macros at the crate
/// root (`crate::warn`) as their module.
fn crate_uses(text: &str) -> Vec<(String, String)> {
    let ident = |s: &str| -> String {
        s.chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect()
    };
    let mut out = Vec::new();
    for line in text.lines().map(code_of) {
        let mut rest = line;
        while let Some(at) = rest.find("crate::") {
            // `$crate::` in a macro is the same crate.
            let after = &rest[at + "crate::".len()..];
            let before = &rest[..at];
            let is_word = before
                .chars()
                .last()
                .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_');
            if !is_word {
                if let Some(group) = after.strip_prefix('{') {
                    let group = group.split('}').next().unwrap_or("");
                    for item in group.split(',') {
                        let name = ident(item.trim());
                        if !name.is_empty() {
                            out.push((name.clone(), format!("crate::{{..{name}..}}")));
                        }
                    }
                } else {
                    let name = ident(after);
                    let path: String = after
                        .chars()
                        .take_while(|c| c.is_ascii_alphanumeric() || *c == '_' || *c == ':')
                        .collect();
                    if !name.is_empty() {
                        out.push((name, format!("crate::{}", path.trim_end_matches(':'))));
                    }
                }
            }
            rest = after;
        }
    }
    out.into_iter()
        .map(|(name, path)| {
            let module = MACROS
                .iter()
                .find(|(m, _)| *m == name)
                .map_or(name, |(_, module)| module.to_string());
            (module, path)
        })
        .collect()
}

#[test]
fn the_use_parser_sees_paths_groups_and_macros() {
    let text = "use crate::store::{Image, BLOCK_SIZE};\n\
        use crate::{debug, probe::Step};\n\
        let x = crate::handoff::marker_path(p); // crate::mirror in a comment\n\
        $crate::log::emit(l);\n\
        my_crate::other::f();\n";
    let modules: Vec<String> = crate_uses(text).into_iter().map(|(m, _)| m).collect();
    assert_eq!(modules, vec!["store", "log", "probe", "handoff", "log"]);
}

/// Modules depend only downward: a `crate::` path from a module to one of
/// its own layer or above is an import cycle waiting to happen.
#[test]
fn modules_use_only_lower_layers() {
    let src = root().join("src");
    let mut upward = Vec::new();
    let mut checked = 0;
    for (path, text) in program_sources() {
        let rel = path.strip_prefix(&src).unwrap();
        let first = rel
            .components()
            .next()
            .unwrap()
            .as_os_str()
            .to_string_lossy();
        let module = first.trim_end_matches(".rs").to_string();
        // The binaries and the crate root sit above every layer.
        if matches!(module.as_str(), "main" | "lib" | "bin") {
            continue;
        }
        let Some(from) = layer_of(&module) else {
            upward.push(format!(
                "src/{}: module {module} is in no layer; add it to LAYERS (and to README.md's Layout)",
                rel.display()
            ));
            continue;
        };
        for (used, written) in crate_uses(&text) {
            if used == module {
                continue;
            }
            checked += 1;
            match layer_of(&used) {
                Some(to) if to < from => {}
                Some(to) => upward.push(format!(
                    "src/{}: {module} (layer {from}) uses {used} (layer {to}) via `{written}`",
                    rel.display()
                )),
                None => upward.push(format!(
                    "src/{}: {module} uses {used} via `{written}`, which is in no layer",
                    rel.display()
                )),
            }
        }
    }
    assert!(checked > 100, "only {checked} crate:: paths found");
    assert!(
        upward.is_empty(),
        "edges that do not go down the layers:\n{}",
        upward.join("\n")
    );
}
