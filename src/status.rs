//! The status line: the C flexnbd's keys in its order and format (each
//! `key=value` pair followed by one space), then keys of ours.

use std::fmt::Write;

/// Migration figures, present while a mirror exists.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MigrationStatus {
    /// Bytes per second over this attempt.
    pub speed: u64,
    /// Seconds since this attempt started.
    pub duration: u64,
    pub seconds_left: u64,
    pub bytes_left: u64,
    /// Only printed when a limit is set.
    pub speed_limit: Option<u64>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Status {
    pub pid: u32,
    pub size: u64,
    pub is_mirroring: bool,
    pub clients_allowed: bool,
    pub num_clients: usize,
    pub has_control: bool,
    pub migration: Option<MigrationStatus>,
    /// Our keys, after the C ones.
    pub extra: Vec<(String, String)>,
}

impl Status {
    /// The line without its newline, trailing space included.
    pub fn render(&self) -> String {
        let mut s = String::with_capacity(256);
        let _ = write!(
            s,
            "pid={} size={} is_mirroring={} clients_allowed={} num_clients={} has_control={} ",
            self.pid,
            self.size,
            self.is_mirroring,
            self.clients_allowed,
            self.num_clients,
            self.has_control
        );
        if let Some(m) = &self.migration {
            let _ = write!(
                s,
                "migration_speed={} migration_duration={} migration_seconds_left={} migration_bytes_left={} ",
                m.speed, m.duration, m.seconds_left, m.bytes_left
            );
            if let Some(limit) = m.speed_limit {
                let _ = write!(s, "migration_speed_limit={limit} ");
            }
        }
        for (k, v) in &self.extra {
            let _ = write!(s, "{k}={v} ");
        }
        s
    }
}

/// Turns a status line into a JSON object: numbers stay numbers, `true` and
/// `false` are booleans, anything else is a string.
pub fn line_to_json(line: &str) -> String {
    let mut out = String::from("{");
    for (i, pair) in line.split_whitespace().enumerate() {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        if i > 0 {
            out.push(',');
        }
        out.push_str(&json_string(key));
        out.push(':');
        let is_number = !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit());
        if is_number || value == "true" || value == "false" {
            out.push_str(value);
        } else {
            out.push_str(&json_string(value));
        }
    }
    out.push('}');
    out
}

fn json_string(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_the_c_keys_in_order_with_trailing_space() {
        let s = Status {
            pid: 7,
            size: 8589934592,
            clients_allowed: true,
            has_control: true,
            ..Default::default()
        };
        assert_eq!(
            s.render(),
            "pid=7 size=8589934592 is_mirroring=false clients_allowed=true num_clients=0 has_control=true "
        );
    }

    #[test]
    fn speed_limit_only_when_set() {
        let mut s = Status {
            pid: 1,
            size: 2,
            is_mirroring: true,
            ..Default::default()
        };
        s.migration = Some(MigrationStatus {
            speed: 4,
            duration: 1,
            seconds_left: 20,
            bytes_left: 88,
            speed_limit: None,
        });
        assert!(!s.render().contains("migration_speed_limit"));
        s.migration.as_mut().unwrap().speed_limit = Some(1000000);
        assert!(s
            .render()
            .ends_with("migration_bytes_left=88 migration_speed_limit=1000000 "));
    }

    #[test]
    fn json_keeps_types() {
        assert_eq!(
            line_to_json("pid=7 is_mirroring=false state=copying "),
            r#"{"pid":7,"is_mirroring":false,"state":"copying"}"#
        );
    }
}
