//! Convergence against a destination slower than the clients.
//!
//! Simulated: our `serve` with three clients doing back-to-back 4 KiB
//! writes, migrating into our `listen` whose every store write first sleeps
//! 1 ms (`store.write=slow(1)`): like the C flexnbd, which syncs every
//! write, each write costs it a millisecond however small, so the clients
//! dirty blocks many times faster than it takes them.
//!
//! What must happen: the migration still converges promptly, with the
//! clients shut out only briefly at the cut-off, and the destination holds
//! every acknowledged write (docs/handoff.md).

use std::fs;
use std::time::{Duration, Instant};

use crate::c_interop::{await_handoff, logged_lockout, start_writers};
use crate::harness::*;
use crate::interop;
use crate::migrate::assert_holds_acked_writes;

const MIB: u64 = 1024 * 1024;

#[test]
fn a_destination_slower_than_the_clients_causes_a_short_lockout_and_a_prompt_migration() {
    let dir = TempDir::new("conv-slow");
    let size = 32 * MIB;
    let data = 16 * MIB;
    let src_file = dir.sparse_file("src.img", size);
    {
        use std::os::unix::fs::FileExt;
        let f = fs::OpenOptions::new().write(true).open(&src_file).unwrap();
        f.write_all_at(&pattern(data as usize, 3), 0).unwrap();
        f.sync_all().unwrap();
    }
    let original = fs::read(&src_file).unwrap();
    let dest_file = dir.sparse_file("dest.img", size);
    let mut args = server_args("listen", &dest_file, None, &[]);
    args.extend(["--faults".into(), "store.write=slow(1)".into()]);
    let mut dest = Flexnbd::spawn(&dir, &args);
    let mut src = interop::source_in(dir, src_file.clone(), &[]);

    let writers = start_writers(src.server.addr, data);
    let started = Instant::now();
    interop::assert_mirror_started(&interop::mirror(&src.sock, dest.port(), false));
    // Longer than the usual bound, so that a migration that is merely too
    // slow fails below with its figures rather than here.
    let logs = await_handoff(&mut src.server, &mut dest, writers, Duration::from_secs(90));
    let took = started.elapsed();
    assert_eq!(marker_state(&dest_file), None, "the marker must be removed");
    assert_holds_acked_writes(&dest_file, original, &logs);
    assert!(
        fs::read(&src_file).unwrap() == fs::read(&dest_file).unwrap(),
        "without --unlink source and destination must be identical after the hand-off"
    );

    // The sweep costs this destination about 130 ms (a millisecond per
    // 256 KiB piece). A cut-off that ignores the cost per write never sees
    // the scattered remainder shrink (the clients re-dirty it faster than
    // it drains), waits seconds for its allowance to grow, then shuts the
    // clients out while seconds' worth of 1 ms writes drain. Pacing the
    // clients to half of the destination's time and cutting off once the
    // remainder's estimated cost is under 25 ms gives a lock-out of tens of
    // milliseconds and a migration of one to two seconds on an idle
    // machine. The bounds leave several times that for a loaded two-core
    // machine and stay well below what the old policy shows.
    let lockout = logged_lockout(&src.server.log());
    assert!(
        lockout < Duration::from_millis(500),
        "clients were shut out for {lockout:?}: expected under 500 ms"
    );
    assert!(
        took < Duration::from_secs(8),
        "the migration took {took:?}: expected under 8 s"
    );
}
