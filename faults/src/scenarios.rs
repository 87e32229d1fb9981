//! A catalogue of named fault scenarios: plans that simulate one failure of a
//! migration (on the source/mirror side or the destination/server side), of
//! the store, or of the control socket, each with what must happen when it is
//! run. Names read `<action>_<when>_<step>`, like `close_after_greeting_send`.
//!
//! The table in `fixtures/faults/README.md` is generated from this list by
//! [`markdown_table`]; a test keeps the two in step (rewrite it with
//! `FLEXNBD_UPDATE_DOCS=1 cargo test -p faults docs`). Every step a plan
//! here names is in [`crate::steps::STEPS`], with an action that makes sense
//! there.

use crate::plan::{FaultPlan, PlanError};

/// One named fault scenario.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Scenario {
    /// `<action>_<when>_<step>`, unique.
    pub name: &'static str,
    /// A fault plan (see [`crate::plan`]).
    pub plan: &'static str,
    /// What failure of the real world this stands for.
    pub simulates: &'static str,
    /// What the system under test must do when the plan runs.
    pub must_happen: &'static str,
}

impl Scenario {
    /// Parses the scenario's plan.
    pub fn fault_plan(&self) -> Result<FaultPlan, PlanError> {
        FaultPlan::parse(self.plan)
    }
}

/// The scenario with this name.
pub fn find(name: &str) -> Option<&'static Scenario> {
    SCENARIOS.iter().find(|s| s.name == name)
}

/// The catalogue, as a Markdown table (name, plan, simulates, must happen).
pub fn markdown_table() -> String {
    let mut out = String::from("| name | plan | simulates | must happen |\n|---|---|---|---|\n");
    for s in SCENARIOS {
        out.push_str(&format!(
            "| `{}` | `{}` | {} | {} |\n",
            s.name, s.plan, s.simulates, s.must_happen
        ));
    }
    out
}

/// Every named scenario.
pub const SCENARIOS: &[Scenario] = &[
    // --- destination (server side of a migration, or any NBD server) ----
    Scenario {
        name: "close_after_accept",
        plan: "server.accept=close",
        simulates: "the destination accepts the connection, then drops it at once (process restarting, listen backlog reset)",
        must_happen: "the mirror reports the failed connection and retries or aborts; the source keeps serving its clients; nothing is entrusted",
    },
    Scenario {
        name: "close_after_greeting_send",
        plan: "server.greeting_send=close",
        simulates: "the destination dies before the handshake completes",
        must_happen: "the mirror fails the handshake with a clear error, sends no data, and retries or aborts; the source keeps serving",
    },
    Scenario {
        name: "corrupt_greeting_magic",
        plan: "server.greeting_send=corrupt",
        simulates: "something that is not an NBD server (or a damaged stream) answers on the destination port",
        must_happen: "the mirror rejects the greeting as bad magic and sends nothing; the source keeps serving",
    },
    Scenario {
        name: "truncate_greeting",
        plan: "server.greeting_send=truncate(8)",
        simulates: "the connection breaks in the middle of the greeting",
        must_happen: "the mirror sees a short greeting, reports it and does not start copying; the source keeps serving",
    },
    Scenario {
        name: "close_after_option_go",
        plan: "server.option_received.7=close",
        simulates: "the destination drops the connection during newstyle negotiation (NBD_OPT_GO)",
        must_happen: "the client or mirror reports the failed negotiation; no request is sent",
    },
    Scenario {
        name: "hang_after_write_request",
        plan: "server.request_received.write#2=hang",
        simulates: "the destination stops making progress in the middle of the copy (stuck disk, frozen VM)",
        must_happen: "the mirror's timeout fires, it tears the connection down and retries or aborts; the source keeps serving its clients throughout",
    },
    Scenario {
        name: "close_after_write_payload",
        plan: "server.payload_received.write#3=close",
        simulates: "the destination drops the connection after a write's payload arrived, before acknowledging it",
        must_happen: "the mirror treats the unacknowledged write as not done and sends that range again after reconnecting; the final destination image equals the source",
    },
    Scenario {
        name: "crash_after_write_payload",
        plan: "server.payload_received.write#5=crash",
        simulates: "the destination process is killed in the middle of the copy",
        must_happen: "the mirror sees the connection reset and reports it; nothing is entrusted; the source keeps serving and still owns the image",
    },
    Scenario {
        name: "drop_write_reply",
        plan: "server.reply_send.write#3=drop",
        simulates: "a write acknowledgement is lost while the connection stays up",
        must_happen: "the mirror does not count the write as done: its timeout fires and it resends the range (or aborts); it never entrusts with a write unacknowledged",
    },
    Scenario {
        name: "close_before_write_reply",
        plan: "server.reply_send.write#3=close",
        simulates: "the destination drops the connection instead of acknowledging the 3rd write",
        must_happen: "the mirror resends the unacknowledged range after reconnecting, or aborts; the final destination image equals the source",
    },
    Scenario {
        name: "corrupt_reply_magic",
        plan: "server.reply_send.write#2=corrupt",
        simulates: "a damaged reply from the destination",
        must_happen: "the mirror rejects the reply as bad magic, drops the connection and treats the write as not acknowledged",
    },
    Scenario {
        name: "delay_write_replies",
        plan: "server.reply_send.write=delay(200)",
        simulates: "a slow destination or a congested link (every write acknowledged 200 ms late)",
        must_happen: "the migration completes, only slower; no timeout fires below the configured limit; the final image equals the source",
    },
    Scenario {
        name: "flaky_write_replies",
        plan: "seed=7; server.reply_send.write=10%5*close",
        simulates: "an unreliable link that breaks now and then (5 breaks, each write reply with a 10% chance)",
        must_happen: "the mirror reconnects after each break and the migration completes; the final image equals the source",
    },
    Scenario {
        name: "crash_after_entrust_received",
        plan: "server.entrust_received=crash",
        simulates: "the destination dies after receiving the hand-off, before acknowledging it",
        must_happen: "the source gets no acknowledgement, so it keeps the image and keeps serving (or reports the failed hand-off); it must not exit",
    },
    Scenario {
        name: "drop_entrust_reply",
        plan: "server.entrust_reply_send=drop",
        simulates: "the hand-off acknowledgement is lost while the connection stays up",
        must_happen: "the source times out waiting for it and does not hand off: it keeps serving or reports the failure; the destination does not serve as owner without the disconnect",
    },
    Scenario {
        name: "close_before_entrust_reply",
        plan: "server.entrust_reply_send=close",
        simulates: "the destination drops the connection instead of acknowledging the hand-off",
        must_happen: "the source does not hand off: it keeps the image and keeps serving or reports the failed migration; no split brain",
    },
    Scenario {
        name: "crash_after_disconnect_received",
        plan: "server.disconnect_received=crash",
        simulates: "the destination is killed right after the hand-off completed",
        must_happen: "the destination image on disk is complete and equals the source (it was made durable before the entrust was acknowledged); restarting the destination on it serves the right data",
    },
    // --- source (mirror side of a migration) -----------------------------
    Scenario {
        name: "close_after_connect",
        plan: "mirror.connect#1=close",
        simulates: "the source's first connection to the destination breaks at once",
        must_happen: "the mirror reports it and retries; the second attempt proceeds and the migration completes",
    },
    Scenario {
        name: "drop_write_request",
        plan: "mirror.request_send.write#4=drop",
        simulates: "a write request from the source is lost while the connection stays up",
        must_happen: "the mirror's timeout fires for the missing reply; it resends the range or aborts; it never entrusts with that write unacknowledged",
    },
    Scenario {
        name: "corrupt_write_request",
        plan: "mirror.request_send.write#2=corrupt",
        simulates: "a damaged request from the source",
        must_happen: "the destination rejects the bad magic and closes the connection without writing anything for that request; the mirror reconnects and resends",
    },
    Scenario {
        name: "close_mid_write_payload",
        plan: "mirror.payload_send.write#3=truncate(512)",
        simulates: "the connection breaks in the middle of a write's payload",
        must_happen: "the destination does not acknowledge the partial write; the mirror resends the whole range after reconnecting; the final image equals the source",
    },
    Scenario {
        name: "delay_write_requests",
        plan: "seed=11; mirror.request_send.write=50%delay(20)",
        simulates: "jitter on the source's side (half the writes sent 20 ms late)",
        must_happen: "the migration completes and the final image equals the source",
    },
    Scenario {
        name: "crash_before_entrust_send",
        plan: "mirror.entrust_send=crash",
        simulates: "the source is killed after the copy, before handing off",
        must_happen: "the destination never received the hand-off: it does not serve as the owner; the source image on disk is intact",
    },
    Scenario {
        name: "hang_before_entrust_send",
        plan: "mirror.entrust_send=hang",
        simulates: "the source freezes just before the hand-off",
        must_happen: "the destination does not take ownership without an entrust; the timeout of whichever side has one fires and is reported",
    },
    Scenario {
        name: "crash_after_entrust_reply_received",
        plan: "mirror.entrust_reply_received=crash",
        simulates: "the source is killed after the hand-off was acknowledged, before it sent the disconnect",
        must_happen: "the destination holds a complete and durable image; no write acknowledged by the source is missing from it",
    },
    Scenario {
        name: "close_before_disconnect_send",
        plan: "mirror.disconnect_send=close",
        simulates: "the connection breaks between the hand-off acknowledgement and the disconnect",
        must_happen: "the destination holds a complete and durable image; the source does not serve again after the acknowledged hand-off",
    },
    // --- store -----------------------------------------------------------
    Scenario {
        name: "eio_on_store_write",
        plan: "store.write#3=eio",
        simulates: "a disk error on the 3rd write to the image",
        must_happen: "that request is answered with an EIO error reply; the connection and server stay up and later writes succeed",
    },
    Scenario {
        name: "enospc_on_store_write",
        plan: "store.write=enospc",
        simulates: "the filesystem holding the image is full",
        must_happen: "every write is answered with an ENOSPC error reply; reads still work; the server does not crash",
    },
    Scenario {
        name: "eio_on_store_read",
        plan: "store.read#2=eio",
        simulates: "an unreadable sector",
        must_happen: "that read is answered with an EIO error reply (no data, or a structured error chunk); the server stays up",
    },
    Scenario {
        name: "eio_on_store_sync",
        plan: "store.sync=eio",
        simulates: "a failed fsync: data may not be durable",
        must_happen: "flush is answered with EIO; a migration destination must not acknowledge the entrust while its image is not durable",
    },
    Scenario {
        name: "slow_store_sync",
        plan: "store.sync=slow(500)",
        simulates: "a slow disk flush (500 ms per sync)",
        must_happen: "flush and FUA writes complete late but correctly; no timeout fires below the configured limit",
    },
    // --- power loss --------------------------------------------------------
    Scenario {
        name: "powercut_after_write_payload",
        plan: "server.payload_received.write#5=powercut",
        simulates: "the destination machine loses power in the middle of the copy (seeded: every unsynced write lost, none, or a torn subset of sectors)",
        must_happen: "the marker still says receiving; the restarted destination is sent everything again; the source keeps serving and owns the image",
    },
    Scenario {
        name: "powercut_before_entrust_sync",
        plan: "store.sync#1=powercut(all)",
        simulates: "the destination loses power while the entrust is being made durable, before its fdatasync",
        must_happen: "every write since the last sync is lost and the marker says receiving; the source got no entrust reply, so it keeps the image and retries",
    },
    Scenario {
        name: "powercut_after_disconnect_received",
        plan: "server.disconnect_received=powercut(all)",
        simulates: "the destination loses power right after the source handed off and unlinked its copy",
        must_happen: "the marker survives as entrusted and the destination image holds every acknowledged write (both were made durable before the entrust reply)",
    },
    Scenario {
        name: "powercut_after_disconnect_done",
        plan: "server.disconnect_done=powercut(all)",
        simulates: "the destination loses power just after completing the migration",
        must_happen: "the completion record, the marker's removal and the image are durable: the destination is complete and canonical",
    },
    Scenario {
        name: "powercut_before_completion_record",
        plan: "store.record#1=powercut(all)",
        simulates: "the destination loses power after the DISCONNECT and the image's fdatasync, before its completion record is written",
        must_happen: "no record; the marker survives as entrusted beside every acknowledged write; resolve names the destination (entrusted); a restarted listen waits for a sender and changes nothing",
    },
    Scenario {
        name: "crash_after_disconnect_done",
        plan: "server.disconnect_done=crash",
        simulates: "the destination is killed right after completing, before its supervisor saw it exit",
        must_happen: "the completion record names the image and the marker is gone; a listen started again on the image refuses to start (exit 1) and changes nothing; resolve names the destination",
    },
    Scenario {
        name: "powercut_after_disconnect_sent",
        plan: "mirror.disconnect_sent=powercut(all)",
        simulates: "the source loses power after the hand-off, with --unlink",
        must_happen: "the unlink was made durable before the disconnect went out: the source image does not come back",
    },
    Scenario {
        name: "powercut_before_fua_reply",
        plan: "server.reply_send.write#2=powercut(all)",
        simulates: "a server loses power while clients write",
        must_happen: "every write acknowledged with FUA, or before a completed FLUSH, is in the image afterwards",
    },
    // --- control socket --------------------------------------------------
    Scenario {
        name: "close_after_control_status",
        plan: "control.status=close",
        simulates: "the control connection breaks before the status reply",
        must_happen: "the control client reports the broken connection; the server keeps serving",
    },
];

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn every_plan_parses_and_names_known_steps() {
        for s in SCENARIOS {
            let plan = s
                .fault_plan()
                .unwrap_or_else(|e| panic!("scenario {}: {e}", s.name));
            assert!(!plan.is_empty(), "scenario {} has an empty plan", s.name);
            assert!(
                plan.warnings().is_empty(),
                "scenario {}: {:?}",
                s.name,
                plan.warnings()
            );
        }
    }

    /// Each entry of each scenario names a step of the table
    /// ([`crate::steps::STEPS`]) with an action that makes sense there: a
    /// scenario that "corrupts" a received message would describe a fault
    /// that cannot happen.
    #[test]
    fn every_step_and_action_is_in_the_step_table() {
        for s in SCENARIOS {
            let plan = s.fault_plan().expect("checked above");
            for entry in plan.entries() {
                let def =
                    crate::steps::find(entry.key.side, &entry.key.step).unwrap_or_else(|| {
                        panic!(
                            "scenario {}: {} is not in faults::steps::STEPS",
                            s.name, entry.key
                        )
                    });
                for term in &entry.chain {
                    let act = term.act();
                    assert!(
                        def.allows(act),
                        "scenario {}: {} at {}: expected one of {:?} (the table's actions for {})",
                        s.name,
                        act,
                        entry.key,
                        def.actions,
                        def.key()
                    );
                }
            }
        }
    }

    #[test]
    fn names_are_unique_and_well_formed() {
        let mut seen = HashSet::new();
        for s in SCENARIOS {
            assert!(seen.insert(s.name), "duplicate scenario {}", s.name);
            assert!(
                s.name
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_'),
                "{}",
                s.name
            );
            assert!(!s.simulates.is_empty() && !s.must_happen.is_empty());
            assert!(!s.simulates.contains('|') && !s.must_happen.contains('|'));
        }
        assert!(SCENARIOS.len() >= 20);
    }

    #[test]
    fn covers_both_sides_of_a_migration_and_the_store() {
        for side in ["server.", "mirror.", "store."] {
            assert!(
                SCENARIOS.iter().any(|s| s.plan.contains(side)),
                "no scenario for {side}"
            );
        }
        for name in [
            "close_after_greeting_send",
            "drop_entrust_reply",
            "crash_after_entrust_received",
            "close_mid_write_payload",
            "hang_after_write_request",
            "corrupt_reply_magic",
            "eio_on_store_write",
            "enospc_on_store_write",
            "slow_store_sync",
        ] {
            assert!(find(name).is_some(), "missing scenario {name}");
        }
    }

    const README: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../fixtures/faults/README.md");
    const BEGIN: &str =
        "<!-- scenarios:begin (generated by faults::scenarios::markdown_table) -->\n";
    const END: &str = "<!-- scenarios:end -->";

    #[test]
    fn docs_scenario_table_matches_the_catalogue() {
        let text = std::fs::read_to_string(README).expect("fixtures/faults/README.md");
        let table = markdown_table();
        let (before, rest) = text
            .split_once(BEGIN)
            .expect("README lacks the begin marker");
        let (current, after) = rest.split_once(END).expect("README lacks the end marker");
        if current != table {
            if std::env::var_os("FLEXNBD_UPDATE_DOCS").is_some() {
                std::fs::write(README, format!("{before}{BEGIN}{table}{END}{after}")).unwrap();
            } else {
                panic!(
                    "fixtures/faults/README.md: the scenario table differs from SCENARIOS.\n\
                     Expected:\n{table}\nFound:\n{current}\n\
                     Update it with: FLEXNBD_UPDATE_DOCS=1 cargo test -p faults docs"
                );
            }
        }
    }

    #[test]
    fn every_scenario_name_appears_in_the_readme() {
        let text = std::fs::read_to_string(README).expect("fixtures/faults/README.md");
        for s in SCENARIOS {
            assert!(
                text.contains(&format!("| `{}` | `{}` |", s.name, s.plan)),
                "scenario {} (plan {}) is not in fixtures/faults/README.md",
                s.name,
                s.plan
            );
        }
    }
}
