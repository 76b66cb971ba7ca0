//! Invites and devices waiting for an answer: what a peer can make this node keep
//! before anyone accepted it, and where an accepted invite may put a folder.
//!
//! Invites are taken only from accepted devices (a stranger shows up as a pending
//! device), at most [`MAX_INVITES_PER_DEVICE`] per device and [`MAX_PENDING_INVITES`]
//! in all, keyed by (inviting device, folder) so that nobody can replace another
//! device's invite. Pending devices are at most [`MAX_PENDING_DEVICES`], the oldest
//! dropped. An invite's label is a display name: it names the folder's directory only
//! when it is a plain name ([`plain_name`]), and accepting without an explicit path
//! never takes a directory that exists and holds anything ([`check_default_place`]).

use std::collections::BTreeMap;
use std::path::Path;

use weft_protocol::DeviceId;

/// Invites kept from one device (a person shares a handful of folders at once).
pub const MAX_INVITES_PER_DEVICE: usize = 16;
/// Invites kept in all, until answered.
pub const MAX_PENDING_INVITES: usize = 64;
/// Devices that connected without being accepted, kept for `weft device list
/// --pending`; the oldest is dropped beyond this.
pub const MAX_PENDING_DEVICES: usize = 64;
/// Longest directory name taken from a label, in bytes (most filesystems' limit).
pub const MAX_NAME_LEN: usize = 255;

/// The label as a directory name, if it is a plain one: no separators, not `.` or
/// `..`, not hidden, no control characters, at most [`MAX_NAME_LEN`] bytes.
pub fn plain_name(label: &str) -> Option<&str> {
    let plain = !label.is_empty()
        && label.len() <= MAX_NAME_LEN
        && !label.starts_with('.')
        && !label.contains(['/', '\\'])
        && !label.chars().any(char::is_control)
        && label.trim() == label;
    plain.then_some(label)
}

/// Whether a folder may be made at `path` when the user did not name the place: only
/// where nothing is, or an empty directory is.
pub fn check_default_place(path: &Path) -> Result<(), String> {
    match std::fs::symlink_metadata(path) {
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(error) => Err(format!("cannot look at {}: {error}", path.display())),
        Ok(meta) if meta.is_dir() => {
            let empty = std::fs::read_dir(path)
                .map_err(|error| format!("cannot read {}: {error}", path.display()))?
                .next()
                .is_none();
            if empty {
                Ok(())
            } else {
                Err(format!(
                    "{} already exists and holds files; accepting there would share them with the folder's members. Choose another place with --path, or pass --path {} to share its files",
                    path.display(),
                    path.display()
                ))
            }
        }
        Ok(_) => Err(format!(
            "{} already exists and is not a directory; choose a place with --path",
            path.display()
        )),
    }
}

/// Devices that connected without being accepted, oldest dropped first.
#[derive(Debug, Default)]
pub struct PendingDevices {
    by_device: BTreeMap<DeviceId, (u64, String)>,
    next: u64,
}

impl PendingDevices {
    /// Notes a device (and its address); the oldest is dropped if there are too many.
    pub fn insert(&mut self, device: DeviceId, address: String) {
        self.next += 1;
        self.by_device.insert(device, (self.next, address));
        while self.by_device.len() > MAX_PENDING_DEVICES {
            let oldest = self
                .by_device
                .iter()
                .min_by_key(|(_, (seq, _))| *seq)
                .map(|(device, _)| *device);
            match oldest {
                Some(device) => self.by_device.remove(&device),
                None => break,
            };
        }
    }

    /// Forgets a device; true if it was pending.
    pub fn remove(&mut self, device: &DeviceId) -> bool {
        self.by_device.remove(device).is_some()
    }

    /// Pending devices and their addresses, oldest first.
    pub fn list(&self) -> Vec<(DeviceId, String)> {
        let mut list: Vec<_> = self
            .by_device
            .iter()
            .map(|(device, (seq, address))| (*seq, *device, address.clone()))
            .collect();
        list.sort_by_key(|(seq, _, _)| *seq);
        list.into_iter()
            .map(|(_, device, address)| (device, address))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use weft_protocol::DeviceKey;

    #[test]
    fn only_plain_labels_name_a_directory() {
        for plain in ["Photos", "Holiday 2026", "été"] {
            assert_eq!(plain_name(plain), Some(plain));
        }
        for not in [
            "",
            ".",
            "..",
            ".ssh",
            "a/b",
            "..\\x",
            "bin\u{0}",
            " Documents",
            "x\n",
            &"n".repeat(256),
        ] {
            assert_eq!(plain_name(not), None, "{not:?}");
        }
    }

    #[test]
    fn a_default_place_must_be_empty_or_absent() {
        let dir = tempfile::tempdir().unwrap();
        assert!(check_default_place(&dir.path().join("new")).is_ok());
        std::fs::create_dir(dir.path().join("empty")).unwrap();
        assert!(check_default_place(&dir.path().join("empty")).is_ok());
        std::fs::create_dir(dir.path().join("Documents")).unwrap();
        std::fs::write(dir.path().join("Documents/tax.pdf"), b"private").unwrap();
        let refused = check_default_place(&dir.path().join("Documents")).unwrap_err();
        assert!(refused.contains("--path"), "{refused}");
        std::fs::write(dir.path().join("file"), b"x").unwrap();
        assert!(check_default_place(&dir.path().join("file")).is_err());
    }

    #[test]
    fn pending_devices_keep_the_newest() {
        let mut pending = PendingDevices::default();
        let device = |n: u32| {
            let mut secret = [0u8; 32];
            secret[..4].copy_from_slice(&n.to_le_bytes());
            DeviceKey::from_secret_bytes(secret).device_id()
        };
        for n in 0..(MAX_PENDING_DEVICES as u32 + 10) {
            pending.insert(device(n), format!("addr {n}"));
        }
        let list = pending.list();
        assert_eq!(list.len(), MAX_PENDING_DEVICES);
        assert_eq!(list[0].0, device(10));
        assert!(pending.remove(&device(20)));
        assert!(!pending.remove(&device(0)));
    }
}
