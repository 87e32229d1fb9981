//! A pipelining client's small writes are stored together (one trip to the
//! I/O pool per burst) and answered only once stored. What must hold however
//! a burst is cut into batches: a read, flush or disconnect behind writes
//! sees all of them; each write gets its own result; nothing is acknowledged
//! that is not in the file.

use std::collections::HashMap;
use std::os::unix::process::ExitStatusExt;

use flexnbd::proto::{self, cmd, errno, Request};

use crate::harness::*;

const BLOCK: usize = 4096;
const BLOCKS: u64 = 40;

/// `serve` on a sparse 1 MiB image, oldstyle, with an optional fault plan.
fn served(tag: &str, plan: Option<&str>) -> (TempDir, std::path::PathBuf, Flexnbd, RawClient) {
    let dir = TempDir::new(tag);
    let file = dir.sparse_file("disk.img", 1 << 20);
    let extra: Vec<&str> = plan.map(|p| vec!["--faults", p]).unwrap_or_default();
    let server = Flexnbd::spawn(&dir, &server_args("serve", &file, None, &extra));
    let mut c = server.connect();
    c.oldstyle_greeting();
    (dir, file, server, c)
}

fn block(i: u64) -> Vec<u8> {
    pattern(BLOCK, i as u8 + 1)
}

/// Reads replies (in whatever order they come) until every handle in
/// `expect` has one: handle -> (error, data for reads).
fn replies(c: &mut RawClient, expect: &HashMap<u64, (u16, u32)>) -> HashMap<u64, (u32, Vec<u8>)> {
    let mut got = HashMap::new();
    while got.len() < expect.len() {
        let r = c.simple_reply();
        assert_eq!(r.magic, proto::SIMPLE_REPLY_MAGIC, "reply magic");
        let Some(&(kind, len)) = expect.get(&r.handle) else {
            panic!("a reply for handle {} that no request had", r.handle);
        };
        let data = if kind == cmd::READ && r.error == 0 {
            c.read_exact(len as usize)
        } else {
            Vec::new()
        };
        assert!(
            got.insert(r.handle, (r.error, data)).is_none(),
            "two replies for handle {}",
            r.handle
        );
    }
    got
}

#[test]
fn reads_pipelined_behind_writes_see_every_write_and_each_request_is_answered_once() {
    let (_dir, file, server, mut c) = served("batch-read-after-write", None);
    // One send: 40 writes, a read of each block, an overwrite of block 0
    // and a second read of it. The server takes it in as one burst.
    let mut burst = Vec::new();
    let mut expect = HashMap::new();
    let mut handle = 0u64;
    let mut push = |burst: &mut Vec<u8>, kind: u16, offset: u64, data: Option<&[u8]>| {
        handle += 1;
        let len = data.map_or(BLOCK, |d| d.len()) as u32;
        burst.extend_from_slice(&Request::new(kind, 0, handle, offset, len).encode());
        if let Some(d) = data {
            burst.extend_from_slice(d);
        }
        expect.insert(handle, (kind, len));
        handle
    };
    for i in 0..BLOCKS {
        push(&mut burst, cmd::WRITE, i * BLOCK as u64, Some(&block(i)));
    }
    let reads: Vec<u64> = (0..BLOCKS)
        .map(|i| push(&mut burst, cmd::READ, i * BLOCK as u64, None))
        .collect();
    let over = pattern(BLOCK, 200);
    push(&mut burst, cmd::WRITE, 0, Some(&over));
    let reread = push(&mut burst, cmd::READ, 0, None);
    c.send(&burst);
    let got = replies(&mut c, &expect);
    for (h, (error, _)) in &got {
        assert_eq!(*error, 0, "request {h} failed");
    }
    for (i, h) in reads.iter().enumerate() {
        assert!(
            got[h].1 == block(i as u64),
            "read of block {i} after its write"
        );
    }
    assert!(
        got[&reread].1 == over,
        "read of block 0 after its overwrite"
    );
    let mut expected = over.clone();
    for i in 1..BLOCKS {
        expected.extend_from_slice(&block(i));
    }
    assert!(
        read_file_range(&file, 0, expected.len()) == expected,
        "the file holds every acknowledged write"
    );
    server.assert_no_panic();
}

#[test]
fn a_failing_write_in_a_burst_gets_its_own_error_and_the_others_land() {
    const BAD: u64 = 8;
    let key = format!("store.write@{}+{BLOCK}", BAD * BLOCK as u64);
    let (_dir, file, server, mut c) = served("batch-one-fails", Some(&format!("{key}=eio")));
    let mut burst = Vec::new();
    let mut expect = HashMap::new();
    for i in 0..BLOCKS {
        let r = Request::new(cmd::WRITE, 0, i + 1, i * BLOCK as u64, BLOCK as u32);
        burst.extend_from_slice(&r.encode());
        burst.extend_from_slice(&block(i));
        expect.insert(i + 1, (cmd::WRITE, BLOCK as u32));
    }
    c.send(&burst);
    let got = replies(&mut c, &expect);
    server.assert_fired(&key, "eio");
    for i in 0..BLOCKS {
        let want = if i == BAD { errno::EIO } else { 0 };
        assert_eq!(got[&(i + 1)].0, want, "the reply to the write of block {i}");
        let content = read_file_range(&file, i * BLOCK as u64, BLOCK);
        if i == BAD {
            assert!(
                content == vec![0; BLOCK],
                "the failed write left its block as it was"
            );
        } else {
            assert!(content == block(i), "block {i} was written");
        }
    }
    server.assert_no_panic();
}

#[test]
fn a_flush_pipelined_behind_writes_makes_all_of_them_durable() {
    // The flush arrives in the same burst as the writes, before any of them
    // is answered: the power cut at its reply must find every one in place,
    // so the writes were stored before the flush's sync began.
    let key = "server.reply_send.flush";
    let (_dir, file, mut server, mut c) =
        served("batch-flush", Some(&format!("{key}=powercut(all)")));
    let mut burst = Vec::new();
    for i in 0..BLOCKS {
        let r = Request::new(cmd::WRITE, 0, i + 1, i * BLOCK as u64, BLOCK as u32);
        burst.extend_from_slice(&r.encode());
        burst.extend_from_slice(&block(i));
    }
    burst.extend_from_slice(&Request::new(cmd::FLUSH, 0, 999, 0, 0).encode());
    c.send(&burst);
    let status = server.wait_exit();
    assert_eq!(status.signal(), Some(libc::SIGKILL), "the power cut's exit");
    server.assert_fired(key, "powercut(all)");
    assert!(
        server.log().contains("power cut (all): "),
        "the power cut's report"
    );
    for i in 0..BLOCKS {
        assert!(
            read_file_range(&file, i * BLOCK as u64, BLOCK) == block(i),
            "block {i}, written before the flush, survived the power cut"
        );
    }
    server.assert_no_panic();
}
