//! Log lines in the flexnbd format, on stderr:
//! `<monotonic ms>:<level letter>:<pid> <task> <context> <file>:<line>: <message>`
//!
//! The sink (the level threshold and stderr) is the process's. The
//! `<context>` says which instance wrote the line: the tag of the innermost
//! [`scope`] (a tokio task) or [`scoped`] (a thread) around the code that
//! logs, else the process default ([`set_context`]), so two instances in
//! one process are told apart.

use std::cell::RefCell;
use std::future::Future;
use std::io::Write;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, OnceLock};

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
#[repr(u8)]
pub enum Level {
    Debug = 0,
    Info = 1,
    Warn = 2,
    Error = 3,
    Fatal = 4,
}

impl Level {
    fn letter(self) -> char {
        match self {
            Level::Debug => 'D',
            Level::Info => 'I',
            Level::Warn => 'W',
            Level::Error => 'E',
            Level::Fatal => 'F',
        }
    }
}

static THRESHOLD: AtomicU8 = AtomicU8::new(Level::Warn as u8);
static DEFAULT_CONTEXT: OnceLock<String> = OnceLock::new();

thread_local! {
    /// The instance tag of the [`scoped`] closure running on this thread.
    static THREAD_CONTEXT: RefCell<Option<Arc<str>>> = const { RefCell::new(None) };
}

tokio::task_local! {
    /// The instance tag of the [`scope`] this task runs in.
    static TASK_CONTEXT: Arc<str>;
}

pub fn set_threshold(level: Level) {
    THRESHOLD.store(level as u8, Ordering::Relaxed);
}

/// The process's default `<context>` field: the served file in
/// serve/listen, empty elsewhere. Set once, at start-up.
pub fn set_context(context: String) {
    let _ = DEFAULT_CONTEXT.set(context);
}

/// Runs `f` with `tag` as the `<context>` of the lines logged on this
/// thread meanwhile (blocking code of one instance).
pub fn scoped<T>(tag: &Arc<str>, f: impl FnOnce() -> T) -> T {
    let previous = THREAD_CONTEXT.with(|c| c.replace(Some(tag.clone())));
    // Restored even if `f` unwinds, so the tag never leaks to whatever
    // runs on this thread next.
    struct Restore(Option<Arc<str>>);
    impl Drop for Restore {
        fn drop(&mut self) {
            let previous = self.0.take();
            THREAD_CONTEXT.with(|c| *c.borrow_mut() = previous);
        }
    }
    let _restore = Restore(previous);
    f()
}

/// `fut` with `tag` as the `<context>` of the lines it logs (an instance's
/// tasks). Tasks it spawns need a scope of their own.
pub async fn scope<F: Future>(tag: Arc<str>, fut: F) -> F::Output {
    TASK_CONTEXT.scope(tag, fut).await
}

/// The `<context>` for a line logged here and now.
fn with_context<T>(f: impl FnOnce(&str) -> T) -> T {
    if let Ok(tag) = TASK_CONTEXT.try_with(|t| t.clone()) {
        return f(&tag);
    }
    let thread = THREAD_CONTEXT.with(|c| c.borrow().clone());
    match thread {
        Some(tag) => f(&tag),
        None => f(DEFAULT_CONTEXT.get().map(String::as_str).unwrap_or("")),
    }
}

#[inline]
pub fn enabled(level: Level) -> bool {
    level as u8 >= THRESHOLD.load(Ordering::Relaxed)
}

/// Milliseconds on CLOCK_MONOTONIC: what log lines start with, and the one
/// clock the mirror's status figures (duration, speed) are measured on.
pub(crate) fn monotonic_ms() -> u64 {
    // Lines start with CLOCK_MONOTONIC in ms, as the C flexnbd's do: one
    // clock for every process on the host, so the logs of a source and a
    // destination on one host interleave in order. std's Instant does not
    // expose its value, hence rustix. CLOCK_MONOTONIC always exists on
    // Linux; should the call fail anyway, the time reads as 0 rather than
    // taking the process down (rustix's infallible `clock_gettime` would
    // panic).
    use rustix::time::{clock_gettime_dynamic, ClockId, DynamicClockId};
    match clock_gettime_dynamic(DynamicClockId::Known(ClockId::Monotonic)) {
        Ok(ts) => ts.tv_sec as u64 * 1000 + ts.tv_nsec as u64 / 1_000_000,
        Err(_) => 0,
    }
}

fn task_name() -> String {
    match tokio::task::try_id() {
        Some(id) => format!("task-{id}"),
        None => std::thread::current()
            .name()
            .unwrap_or("thread")
            .replace(' ', "-"),
    }
}

pub fn emit(level: Level, file: &str, line: u32, message: std::fmt::Arguments<'_>) {
    let text = with_context(|context| {
        format!(
            "{}:{}:{} {} {} {}:{}: {}\n",
            monotonic_ms(),
            level.letter(),
            std::process::id(),
            task_name(),
            context,
            file,
            line,
            message
        )
    });
    // One write per line so lines from different threads never interleave.
    let _ = std::io::stderr().lock().write_all(text.as_bytes());
}

#[macro_export]
macro_rules! log_at {
    ($level:expr, $($arg:tt)*) => {
        if $crate::log::enabled($level) {
            $crate::log::emit($level, file!(), line!(), format_args!($($arg)*))
        }
    };
}
#[macro_export]
macro_rules! debug { ($($arg:tt)*) => { $crate::log_at!($crate::log::Level::Debug, $($arg)*) }; }
#[macro_export]
macro_rules! info { ($($arg:tt)*) => { $crate::log_at!($crate::log::Level::Info, $($arg)*) }; }
#[macro_export]
macro_rules! warn { ($($arg:tt)*) => { $crate::log_at!($crate::log::Level::Warn, $($arg)*) }; }
#[macro_export]
macro_rules! error { ($($arg:tt)*) => { $crate::log_at!($crate::log::Level::Error, $($arg)*) }; }
#[macro_export]
macro_rules! fatal { ($($arg:tt)*) => { $crate::log_at!($crate::log::Level::Fatal, $($arg)*) }; }

#[cfg(test)]
mod tests {
    use super::*;

    fn context_now() -> String {
        with_context(str::to_owned)
    }

    #[test]
    fn a_thread_scope_tags_its_lines_and_ends_with_its_closure() {
        let a: Arc<str> = Arc::from("a.img");
        let b: Arc<str> = Arc::from("b.img");
        let outside = context_now();
        scoped(&a, || {
            assert_eq!(context_now(), "a.img");
            scoped(&b, || assert_eq!(context_now(), "b.img"));
            assert_eq!(context_now(), "a.img", "the inner scope ended");
        });
        assert_eq!(context_now(), outside);
        // A panicking closure does not leave its tag behind.
        let _ = std::panic::catch_unwind(|| scoped(&a, || panic!("inside")));
        assert_eq!(context_now(), outside);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn two_instances_in_one_process_are_told_apart() {
        let one = tokio::spawn(scope(Arc::from("one.img"), async {
            tokio::task::yield_now().await;
            context_now()
        }));
        let two = tokio::spawn(scope(Arc::from("two.img"), async {
            tokio::task::yield_now().await;
            context_now()
        }));
        assert_eq!(one.await.unwrap(), "one.img");
        assert_eq!(two.await.unwrap(), "two.img");
    }
}
