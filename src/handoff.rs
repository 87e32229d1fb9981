//! The migration hand-off contract (docs/handoff.md): the destination's
//! `.INCOMPLETE` marker, and the verdict table that tells a person which copy
//! of a disk is canonical after any failure.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use crate::probe::StoreStep;
use crate::store::files;

/// What the marker says about the destination image.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MarkerState {
    /// Data may be partial: the destination must not be served.
    Receiving,
    /// Every byte the source sent is durable; only the disconnect is missing.
    Entrusted,
}

impl MarkerState {
    pub fn name(self) -> &'static str {
        match self {
            MarkerState::Receiving => "receiving",
            MarkerState::Entrusted => "entrusted",
        }
    }
}

/// The marker's path: `<dest-file>.INCOMPLETE`, next to the image.
pub fn marker_path(image: &Path) -> PathBuf {
    let mut name = image.as_os_str().to_owned();
    name.push(".INCOMPLETE");
    PathBuf::from(name)
}

/// Fsyncs the directory holding `path`, so a create, rename or unlink in it
/// is durable.
pub fn sync_parent(path: &Path) -> io::Result<()> {
    files::ops().sync_dir(files::parent_dir(path))
}

/// Removes the source image for `--unlink`, durably: the unlink, then an
/// fsync of its directory, so a power cut cannot bring the file back after
/// the destination was told to take over.
pub fn unlink_durably(path: &Path) -> io::Result<()> {
    files::fault(StoreStep::Unlink)?;
    files::ops().remove(path)?;
    sync_parent(path)
}

/// The marker's fields, written as `key=value` lines a person can read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Marker {
    pub state: MarkerState,
    /// The sender's address, when one is known.
    pub source: Option<String>,
    /// When the current attempt began (seconds since the epoch).
    pub attempt_started: u64,
    pub bytes_received: u64,
    pub pid: u32,
}

impl Marker {
    pub fn new(state: MarkerState) -> Marker {
        Marker {
            state,
            source: None,
            attempt_started: now_secs(),
            bytes_received: 0,
            pid: std::process::id(),
        }
    }

    pub fn render(&self) -> String {
        format!(
            "state={}\nsource={}\nattempt_started={}\nbytes_received={}\npid={}\n",
            self.state.name(),
            self.source.as_deref().unwrap_or("none"),
            self.attempt_started,
            self.bytes_received,
            self.pid
        )
    }

    /// Writes the marker durably: a temporary file, fsync, rename over the
    /// marker, fsync the directory. A crash leaves the old or the new marker,
    /// never a torn one.
    pub fn write_durably(&self, image: &Path) -> io::Result<()> {
        let path = marker_path(image);
        let mut tmp = path.clone().into_os_string();
        tmp.push(".tmp");
        let tmp = PathBuf::from(tmp);
        files::fault(StoreStep::Marker)?;
        let ops = files::ops();
        ops.write_file(&tmp, self.render().as_bytes(), true)?;
        ops.rename(&tmp, &path)?;
        sync_parent(&path)
    }
}

pub fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Reads the marker's state. `Ok(None)` when there is no marker; an
/// unreadable or unrecognised marker counts as `receiving` (the safe answer).
pub fn read_marker_state(image: &Path) -> io::Result<Option<MarkerState>> {
    let text = match fs::read_to_string(marker_path(image)) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let state = text
        .lines()
        .find_map(|l| l.strip_prefix("state="))
        .map(str::trim);
    Ok(Some(match state {
        Some("entrusted") => MarkerState::Entrusted,
        _ => MarkerState::Receiving,
    }))
}

/// Removes the marker durably (after the image itself is durable).
pub fn remove_marker(image: &Path) -> io::Result<()> {
    let path = marker_path(image);
    files::fault(StoreStep::Marker)?;
    match files::ops().remove(&path) {
        Ok(()) => sync_parent(&path),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// Which copy is canonical.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// The source file exists: it is canonical.
    Source,
    /// No source, no marker: the destination is complete.
    Destination,
    /// No source, marker `entrusted`: the destination holds everything; only
    /// the disconnect was lost.
    DestinationEntrusted,
    /// No source, marker `receiving`: the forbidden row (data loss).
    Impossible,
}

impl Verdict {
    /// A distinct exit status per verdict, for scripts.
    pub fn exit_code(self) -> u8 {
        match self {
            Verdict::Source => 10,
            Verdict::Destination => 11,
            Verdict::DestinationEntrusted => 12,
            Verdict::Impossible => 13,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Verdict::Source => "source",
            Verdict::Destination => "destination",
            Verdict::DestinationEntrusted => "destination-entrusted",
            Verdict::Impossible => "impossible",
        }
    }
}

/// Applies the verdict table.
pub fn verdict(source_exists: bool, marker: Option<MarkerState>) -> Verdict {
    match (source_exists, marker) {
        (true, _) => Verdict::Source,
        (false, None) => Verdict::Destination,
        (false, Some(MarkerState::Entrusted)) => Verdict::DestinationEntrusted,
        (false, Some(MarkerState::Receiving)) => Verdict::Impossible,
    }
}

/// The reason and the one action to take, for a person.
pub fn explain(v: Verdict, dest: &Path) -> (String, String) {
    let marker = marker_path(dest);
    match v {
        Verdict::Source => (
            "the source image still exists, so the migration did not hand off".into(),
            format!("keep serving the source; discard the destination copy {} (or retry the migration)", dest.display()),
        ),
        Verdict::Destination => (
            "the source image is gone and the destination has no .INCOMPLETE marker: the migration completed".into(),
            format!("serve the destination {}", dest.display()),
        ),
        Verdict::DestinationEntrusted => (
            "the source image is gone and the destination marker says entrusted: all data was durable before the source unlinked; only the disconnect was lost".into(),
            format!("remove the marker {} and serve the destination {}", marker.display(), dest.display()),
        ),
        Verdict::Impossible => (
            "the source image is gone but the destination marker says receiving: the destination may be missing acknowledged writes".into(),
            "do not serve either copy; restore from backup and report this as a bug".into(),
        ),
    }
}

/// The destination's side of the contract, shared by its connections.
pub struct Destination {
    image_path: PathBuf,
    /// Cancelled once a valid DISCONNECT completed the migration.
    pub completed: tokio_util::sync::CancellationToken,
}

impl Destination {
    /// Creates the marker durably (`state=receiving`) unless one exists.
    /// Must run before the port accepts anything.
    pub fn prepare(image_path: &Path) -> io::Result<Destination> {
        if read_marker_state(image_path)?.is_none() {
            Marker::new(MarkerState::Receiving).write_durably(image_path)?;
        }
        Ok(Destination {
            image_path: image_path.to_owned(),
            completed: tokio_util::sync::CancellationToken::new(),
        })
    }

    /// The first data-changing request of a sender connection: the marker
    /// says `receiving` (durably) before any of its data is applied, so an
    /// `entrusted` marker never sits beside half-overwritten data.
    pub fn begin_receiving(&self, source: &str) -> io::Result<()> {
        let mut m = Marker::new(MarkerState::Receiving);
        m.source = Some(source.to_string());
        m.write_durably(&self.image_path)
    }

    /// ENTRUST: the image is made durable, then the marker says `entrusted`.
    /// The caller replies only after this returns Ok.
    pub fn entrust(
        &self,
        image: &crate::store::Image,
        source: &str,
        bytes_received: u64,
    ) -> io::Result<()> {
        image.sync()?;
        let mut m = Marker::new(MarkerState::Entrusted);
        m.source = Some(source.to_string());
        m.bytes_received = bytes_received;
        m.write_durably(&self.image_path)
    }

    /// DISCONNECT: the image is made durable, the marker removed (durably),
    /// and the migration is complete.
    pub fn complete(&self, image: &crate::store::Image) -> io::Result<()> {
        image.sync()?;
        remove_marker(&self.image_path)?;
        self.completed.cancel();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verdict_table() {
        assert_eq!(verdict(true, None), Verdict::Source);
        assert_eq!(verdict(true, Some(MarkerState::Receiving)), Verdict::Source);
        assert_eq!(verdict(true, Some(MarkerState::Entrusted)), Verdict::Source);
        assert_eq!(verdict(false, None), Verdict::Destination);
        assert_eq!(
            verdict(false, Some(MarkerState::Entrusted)),
            Verdict::DestinationEntrusted
        );
        assert_eq!(
            verdict(false, Some(MarkerState::Receiving)),
            Verdict::Impossible
        );
        let codes: std::collections::HashSet<u8> = [
            Verdict::Source,
            Verdict::Destination,
            Verdict::DestinationEntrusted,
            Verdict::Impossible,
        ]
        .iter()
        .map(|v| v.exit_code())
        .collect();
        assert_eq!(codes.len(), 4, "every verdict has its own exit status");
    }

    #[test]
    fn marker_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("dest.img");
        assert_eq!(read_marker_state(&image).unwrap(), None);
        Marker::new(MarkerState::Receiving)
            .write_durably(&image)
            .unwrap();
        assert_eq!(
            read_marker_state(&image).unwrap(),
            Some(MarkerState::Receiving)
        );
        let mut m = Marker::new(MarkerState::Entrusted);
        m.source = Some("127.0.0.1:5555".into());
        m.write_durably(&image).unwrap();
        let text = fs::read_to_string(marker_path(&image)).unwrap();
        assert!(text.starts_with("state=entrusted\nsource=127.0.0.1:5555\n"));
        assert_eq!(
            read_marker_state(&image).unwrap(),
            Some(MarkerState::Entrusted)
        );
        remove_marker(&image).unwrap();
        assert_eq!(read_marker_state(&image).unwrap(), None);
        fs::write(marker_path(&image), "garbage").unwrap();
        assert_eq!(
            read_marker_state(&image).unwrap(),
            Some(MarkerState::Receiving),
            "unknown = receiving"
        );
    }
}
