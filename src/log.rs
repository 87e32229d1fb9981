//! Log lines in the flexnbd format, on stderr:
//! `<monotonic ms>:<level letter>:<pid> <task> <context> <file>:<line>: <message>`

use std::io::Write;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::OnceLock;

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
static CONTEXT: OnceLock<String> = OnceLock::new();

pub fn set_threshold(level: Level) {
    THRESHOLD.store(level as u8, Ordering::Relaxed);
}

/// The `<context>` field: the served file in serve/listen, empty elsewhere.
pub fn set_context(context: String) {
    let _ = CONTEXT.set(context);
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
    let context = CONTEXT.get().map(String::as_str).unwrap_or("");
    let text = format!(
        "{}:{}:{} {} {} {}:{}: {}\n",
        monotonic_ms(),
        level.letter(),
        std::process::id(),
        task_name(),
        context,
        file,
        line,
        message
    );
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
