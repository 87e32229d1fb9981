//! What clients were promised, and the check that a copy keeps it.
//!
//! Every sector written carries its write's number in its first 8 bytes, so
//! reading a copy tells which write (or which initial content) each sector
//! holds. A write is *required* on the canonical copy once it was
//! acknowledged, unless a power cut came after its acknowledgement while it
//! was not yet durable (not written with FUA, nor covered by a FLUSH
//! acknowledged after it): then losing it is allowed. A sector may hold the
//! last required write touching it, or any write issued after that one
//! (acknowledged or not); with no required write, its initial content or any
//! write.

use std::collections::BTreeMap;

use super::disk::SECTOR;

/// A write's number as stored in a sector: the first 8 bytes.
pub fn tag_of(sector: &[u8]) -> u64 {
    u64::from_le_bytes(sector[..8].try_into().expect("a sector has 8 bytes"))
}

/// Fills `buf` (whole sectors) with write `id`'s content.
pub fn fill(buf: &mut [u8], id: u64) {
    for (i, sector) in buf.chunks_mut(SECTOR as usize).enumerate() {
        sector.fill((id as u8) ^ (i as u8));
        sector[..8].copy_from_slice(&id.to_le_bytes());
    }
}

/// The two copies: the source's image and the destination's.
pub const HOSTS: usize = 2;

#[derive(Clone, Debug)]
struct Write {
    id: u64,
    acked: bool,
    /// Per copy: the write is durable there (FUA, a later FLUSH, or the
    /// destination's promise at entrust and disconnect).
    durable_on: [bool; HOSTS],
    /// Per copy: a power cut (on any host) came after the acknowledgement,
    /// before the write was durable on that copy.
    at_risk_on: [bool; HOSTS],
}

/// Client writes, per sector, in issue order.
#[derive(Default)]
pub struct Ledger {
    by_sector: BTreeMap<u64, Vec<u64>>,
    writes: BTreeMap<u64, Write>,
}

impl Ledger {
    /// A write of sectors `first..end` was issued.
    pub fn issue(&mut self, id: u64, first: u64, end: u64) {
        for s in first..end {
            self.by_sector.entry(s).or_default().push(id);
        }
        self.writes.insert(
            id,
            Write {
                id,
                acked: false,
                durable_on: [false; HOSTS],
                at_risk_on: [false; HOSTS],
            },
        );
    }

    /// The write was acknowledged by `host`; `durable` for a FUA write.
    pub fn ack(&mut self, id: u64, host: usize, durable: bool) {
        if let Some(w) = self.writes.get_mut(&id) {
            w.acked = true;
            w.durable_on[host] = durable;
        }
    }

    /// Writes acknowledged so far and not durable on `host`.
    pub fn volatile_on(&self, host: usize) -> Vec<u64> {
        self.writes
            .values()
            .filter(|w| w.acked && !w.durable_on[host])
            .map(|w| w.id)
            .collect()
    }

    /// These writes became durable on `host` (a FLUSH acknowledged after
    /// them, or the destination's promise).
    pub fn durable(&mut self, host: usize, ids: &[u64]) {
        for id in ids {
            if let Some(w) = self.writes.get_mut(id) {
                w.durable_on[host] = true;
            }
        }
    }

    /// A new migration attempt starts to overwrite the destination with
    /// the source's content: what the destination held durably no longer
    /// counts; its copy is as good as the source's.
    pub fn copy_restarts(&mut self, from: usize, to: usize) {
        for w in self.writes.values_mut() {
            w.durable_on[to] = w.durable_on[from];
            w.at_risk_on[to] = w.at_risk_on[from];
        }
    }

    /// A power cut: every write acknowledged and not yet durable on a copy
    /// may be missing from that copy.
    pub fn power_cut(&mut self) {
        for w in self.writes.values_mut() {
            if w.acked {
                for h in 0..HOSTS {
                    if !w.durable_on[h] {
                        w.at_risk_on[h] = true;
                    }
                }
            }
        }
    }

    fn required(&self, id: u64, host: usize) -> bool {
        let w = &self.writes[&id];
        w.acked && !w.at_risk_on[host]
    }

    /// Checks the copy on `host`: `tags[s]` is the tag sector `s` holds,
    /// `initial[s]` the tag of the source's initial content. Returns the
    /// first few violations.
    pub fn check(&self, name: &str, host: usize, tags: &[u64], initial: &[u64]) -> Vec<String> {
        let mut out = Vec::new();
        for (s, &tag) in tags.iter().enumerate() {
            let history = self.by_sector.get(&(s as u64)).map_or(&[][..], |v| &v[..]);
            let last_required = history.iter().rposition(|&id| self.required(id, host));
            let ok = match last_required {
                None => tag == initial[s] || history.contains(&tag),
                Some(i) => history[i..].contains(&tag),
            };
            if !ok {
                let want = match last_required {
                    Some(i) => format!("write {} (or a later one)", history[i]),
                    None => format!("initial tag {:#x} or a write", initial[s]),
                };
                out.push(format!(
                    "{name}: sector {s} holds tag {tag:#x}, expected {want}; writes to it: {history:?}"
                ));
                if out.len() >= 5 {
                    break;
                }
            }
        }
        out
    }

    /// How many writes were acknowledged.
    pub fn acked(&self) -> usize {
        self.writes.values().filter(|w| w.acked).count()
    }
}

/// The tag of every sector of `content`.
pub fn tags(content: &[u8]) -> Vec<u64> {
    content.chunks(SECTOR as usize).map(tag_of).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_acknowledged_write_must_be_on_the_copy() {
        let mut l = Ledger::default();
        l.issue(7, 0, 1);
        l.ack(7, 0, false);
        assert!(l.check("c", 0, &[7], &[1]).is_empty());
        assert_eq!(
            l.check("c", 0, &[1], &[1]).len(),
            1,
            "the old content is a loss"
        );
        assert_eq!(l.check("c", 1, &[2], &[1]).len(), 1, "garbage is a loss");
    }

    #[test]
    fn a_power_cut_excuses_only_what_was_not_durable_on_that_copy() {
        let mut l = Ledger::default();
        l.issue(7, 0, 1);
        l.ack(7, 0, true);
        l.issue(8, 1, 2);
        l.ack(8, 0, false);
        l.power_cut();
        assert!(
            l.check("c", 0, &[7, 1], &[1, 1]).is_empty(),
            "write 8 may be lost"
        );
        assert_eq!(
            l.check("c", 0, &[1, 8], &[1, 1]).len(),
            1,
            "write 7 was durable"
        );
        // On the other copy neither was durable.
        assert!(l.check("d", 1, &[1, 1], &[1, 1]).is_empty());
    }

    #[test]
    fn a_flush_makes_earlier_writes_durable_and_later_ones_may_appear() {
        let mut l = Ledger::default();
        l.issue(7, 0, 1);
        l.ack(7, 0, false);
        let before = l.volatile_on(0);
        l.issue(9, 0, 1); // issued, never acknowledged
        l.durable(0, &before);
        l.power_cut();
        assert!(l.check("c", 0, &[7], &[1]).is_empty());
        assert!(
            l.check("c", 0, &[9], &[1]).is_empty(),
            "a later write may land"
        );
        assert_eq!(l.check("c", 0, &[1], &[1]).len(), 1);
    }
}
