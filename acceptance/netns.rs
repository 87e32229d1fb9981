//! Test hosts as network namespaces: two namespaces joined by a veth pair,
//! with addresses from 198.18.0.0/15 (the benchmarking range) and from
//! fd00:198:18::/64, removed when the test ends, whether it passed or not.
//!
//! The links are shaped with the kernel's own tools: bandwidth with `tc`
//! (tbf), a partition by taking the veth down, a blackhole by `blackhole`
//! routes on both sides (packets to the other host are dropped without a
//! reset or an ICMP error). Latency has no kernel tool here (no `netem`):
//! `flexnbd-linkem` delays a TCP stream instead (see its header for what it
//! does not model).
//!
//! A machine without the rights to make namespaces skips these tests: each
//! says why on stderr and appends `<test>: <why>` to the file named by
//! `FLEXNBD_TEST_SKIPS`, which `scripts/test` sets, counts and prints among
//! the tests that did not run.

use std::net::IpAddr;
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};

/// The line that marks a test that did not run for want of namespaces.
pub const SKIP_MARK: &str = "SKIPPED (network namespaces): ";

/// Records that the running test did not run, and why.
fn record_skip(why: &str) {
    eprintln!("{SKIP_MARK}{why}");
    let Some(path) = std::env::var_os("FLEXNBD_TEST_SKIPS") else {
        return;
    };
    let test = std::thread::current()
        .name()
        .unwrap_or("an unnamed test")
        .to_string();
    let line = format!(
        "{test}: needs network namespaces: {}\n",
        why.replace('\n', " ")
    );
    use std::io::Write;
    let appended = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .and_then(|mut f| f.write_all(line.as_bytes()));
    if let Err(e) = appended {
        panic!(
            "cannot record a skipped test in {}: {e}",
            path.to_string_lossy()
        );
    }
}

/// Two hosts, `a` (the source's) and `b` (the destination's).
pub struct Hosts {
    pub a: String,
    pub b: String,
    pub a4: IpAddr,
    pub b4: IpAddr,
    pub a6: IpAddr,
    pub b6: IpAddr,
    /// The veth end inside each host.
    pub dev: &'static str,
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("cannot run ip: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "`ip {}` failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Runs `program args` inside namespace `ns`; fails the test on an error.
pub fn in_ns(ns: &str, program: &str, args: &[&str]) {
    let out = Command::new("ip")
        .args(["netns", "exec", ns, program])
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run ip netns exec: {e}"));
    assert!(
        out.status.success(),
        "`{program} {}` in {ns} failed ({}): {}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
}

impl Hosts {
    /// Two fresh hosts, or why they cannot be made here (then the caller
    /// skips: see [`hosts_or_skip`]).
    pub fn new(tag: &str) -> Result<Hosts, String> {
        static N: AtomicU64 = AtomicU64::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        // Short: interface and namespace names have length limits.
        let base = format!(
            "fn{}{n}{}",
            std::process::id() % 100_000,
            &tag[..tag.len().min(3)]
        );
        let hosts = Hosts {
            a: format!("{base}a"),
            b: format!("{base}b"),
            a4: "198.18.0.1".parse().unwrap(),
            b4: "198.18.0.2".parse().unwrap(),
            a6: "fd00:198:18::1".parse().unwrap(),
            b6: "fd00:198:18::2".parse().unwrap(),
            dev: "eth0",
        };
        ip(&["netns", "add", &hosts.a])?;
        // From here on, Drop removes whatever was made.
        ip(&["netns", "add", &hosts.b])?;
        let (va, vb) = (format!("{base}x"), format!("{base}y"));
        ip(&[
            "link", "add", &va, "netns", &hosts.a, "type", "veth", "peer", "name", &vb, "netns",
            &hosts.b,
        ])?;
        for (ns, v, a4, a6) in [
            (&hosts.a, &va, "198.18.0.1/24", "fd00:198:18::1/64"),
            (&hosts.b, &vb, "198.18.0.2/24", "fd00:198:18::2/64"),
        ] {
            let run = |args: &[&str]| {
                let mut full = vec!["-n", ns.as_str()];
                full.extend_from_slice(args);
                ip(&full)
            };
            run(&["link", "set", v, "name", hosts.dev])?;
            run(&["link", "set", "lo", "up"])?;
            run(&["addr", "add", a4, "dev", hosts.dev])?;
            // No duplicate address detection: the address is usable at once.
            run(&["addr", "add", a6, "dev", hosts.dev, "nodad"])?;
            run(&["link", "set", hosts.dev, "up"])?;
        }
        Ok(hosts)
    }

    /// Both directions limited to `mbit` megabits per second (tbf).
    pub fn shape(&self, mbit: u32) {
        let rate = format!("{mbit}mbit");
        // A burst of at least one full-size packet per timer tick, and a
        // queue of about 20 ms at the rate.
        let burst = format!("{}", (mbit as u64 * 1_000_000 / 8 / 250).max(16 * 1024));
        for ns in [&self.a, &self.b] {
            in_ns(
                ns,
                "tc",
                &[
                    "qdisc", "replace", "dev", self.dev, "root", "tbf", "rate", &rate, "burst",
                    &burst, "latency", "20ms",
                ],
            );
        }
    }

    /// A partition: the link goes down (and, with `false`, up again).
    pub fn link_up(&self, up: bool) {
        let state = if up { "up" } else { "down" };
        for ns in [&self.a, &self.b] {
            ip(&["-n", ns, "link", "set", self.dev, state]).unwrap();
        }
    }

    /// A blackhole: every packet between the hosts is dropped, silently
    /// (no reset, no ICMP error); with `false`, the link carries again.
    pub fn blackhole(&self, on: bool) {
        let verb = if on { "add" } else { "del" };
        for (ns, other4, other6) in [(&self.a, self.b4, self.b6), (&self.b, self.a4, self.a6)] {
            ip(&[
                "-n",
                ns,
                "route",
                verb,
                "blackhole",
                &format!("{other4}/32"),
            ])
            .unwrap();
            ip(&[
                "-n",
                ns,
                "-6",
                "route",
                verb,
                "blackhole",
                &format!("{other6}/128"),
            ])
            .unwrap();
        }
    }

    /// `ip netns exec NS` followed by `program`, for spawning servers.
    pub fn exec_prefix(ns: &str) -> Vec<String> {
        vec!["netns".into(), "exec".into(), ns.into()]
    }
}

impl Drop for Hosts {
    fn drop(&mut self) {
        // The veth pair goes with its namespaces.
        let _ = ip(&["netns", "del", &self.a]);
        let _ = ip(&["netns", "del", &self.b]);
    }
}

/// Two hosts, or `None` after printing the skip line (the caller returns).
pub fn hosts_or_skip(tag: &str) -> Option<Hosts> {
    match Hosts::new(tag) {
        Ok(h) => Some(h),
        Err(why) => {
            record_skip(&why);
            None
        }
    }
}
