//! Who the folder is shared with: the access list in the folder document
//! (`weft_protocol::access`), what it makes of this device, and changes to it.
//!
//! The document is the authority. Until it holds an access list (a device that
//! accepted an invite and has not yet heard from anyone), the folder syncs with the
//! devices its settings name (the inviter), receiving only; every change it receives
//! is still checked against the list at the change's dependencies, so nothing but a
//! history founded by the folder's founder is ever taken. Once founded, the members
//! are the devices on the list, and this device publishes its changes only if its
//! role may edit. A device leaving the list is dropped as a peer and disconnected.

use weft_protocol::DeviceId;
use weft_protocol::access::{AccessList, Role, may_set};

use super::Folder;
use crate::engine::FolderMode;
use crate::io::{FolderIo, Level, Membership};

/// Why the access list could not be changed from this device.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ShareError {
    /// This device's role does not allow it.
    #[error(
        "this device is {} in this folder and cannot set {device} to {}: {reason}; ask an owner or admin of the folder",
        role_text(*mine),
        role_text(*to)
    )]
    NotAllowed {
        /// This device's role.
        mine: Option<Role>,
        /// The device whose role was to change.
        device: DeviceId,
        /// The role asked for.
        to: Option<Role>,
        /// Why not.
        reason: &'static str,
    },
    /// The folder's access list has not arrived yet.
    #[error("this folder's access list has not arrived yet; wait until it has synced once")]
    NotFounded,
    /// The change could not be stored.
    #[error("the change could not be stored: {0}")]
    Store(String),
}

fn role_text(role: Option<Role>) -> &'static str {
    role.map_or("not a member", Role::as_str)
}

impl<T> Folder<T> {
    /// The access list as of the last event.
    pub fn access(&self) -> &AccessList {
        &self.access
    }

    /// The founder of the folder (the root of its access list).
    pub fn founder(&self) -> DeviceId {
        self.founder
    }

    /// Sets `device`'s role (`None`: removes it, and from then on it gets nothing from
    /// this device and its later changes are refused everywhere), if this device's role
    /// allows it; offered to peers at once. Writes nothing to the folder's files, so it
    /// may run between a scan's batches.
    pub fn set_access<I: FolderIo<Temp = T>>(
        &mut self,
        io: &mut I,
        device: DeviceId,
        role: Option<Role>,
    ) -> Result<(), ShareError> {
        let list = self.document.access_list();
        if !list.is_founded() && self.device != self.founder {
            return Err(ShareError::NotFounded);
        }
        may_set(&list, &self.founder, &self.device, &device, role).map_err(|reason| {
            ShareError::NotAllowed {
                mine: list.role(&self.device),
                device,
                to: role,
                reason,
            }
        })?;
        if list.role(&device) == role && list.is_founded() {
            return Ok(());
        }
        if let Err(error) = self
            .document
            .set_access(&device, role, io.now_ns() / 1_000_000)
        {
            return Err(ShareError::Store(error.to_string()));
        }
        if !self.commit_decisions(io, &[]) {
            return Err(ShareError::Store(
                "the store refused the commit; see the log".into(),
            ));
        }
        io.log(
            Level::Info,
            format_args!("{device} is now {} in this folder", role_text(role)),
        );
        self.refresh_access(io);
        self.broadcast(io);
        Ok(())
    }

    /// The founder's first start: the folder's history begins with it writing itself
    /// as owner.
    pub(super) fn found<I: FolderIo<Temp = T>>(&mut self, io: &mut I) {
        if self.device != self.founder || self.document.access_list().is_founded() {
            return;
        }
        if let Err(error) = self.set_access(io, self.device, Some(Role::Owner)) {
            io.log(
                Level::Error,
                format_args!("founding the folder's access list failed: {error}"),
            );
        }
    }

    /// Reads the access list from the document again: members, this device's mode,
    /// and peers that are no longer members dropped and disconnected. A device that
    /// may now edit plans every path, so that the changes it kept local are published.
    pub(super) fn refresh_access<I: FolderIo<Temp = T>>(&mut self, io: &mut I) {
        let list = self.document.access_list();
        if list == self.access && list.is_founded() {
            return;
        }
        let membership = self.membership_of(&list);
        self.apply_membership(io, list, membership);
    }

    /// The members and this device's mode under `list` (the settings' devices, until
    /// the list has arrived).
    pub(super) fn membership_of(&self, list: &AccessList) -> Membership {
        if list.is_founded() {
            Membership {
                mode: if list.role(&self.device).is_some_and(Role::can_edit) {
                    FolderMode::SendReceive
                } else {
                    FolderMode::ReceiveOnly
                },
                devices: list
                    .members()
                    .map(|(device, _)| device)
                    .filter(|device| *device != self.device)
                    .collect(),
            }
        } else {
            Membership {
                mode: if self.device == self.founder {
                    FolderMode::SendReceive
                } else {
                    FolderMode::ReceiveOnly
                },
                devices: self.bootstrap.devices.clone(),
            }
        }
    }

    /// Tells the members whose role changed, and drops peers that left.
    fn apply_membership<I: FolderIo<Temp = T>>(
        &mut self,
        io: &mut I,
        list: AccessList,
        membership: Membership,
    ) {
        let gone: Vec<DeviceId> = self
            .peers
            .keys()
            .copied()
            .filter(|device| !membership.devices.contains(device))
            .collect();
        for device in gone {
            io.log(
                Level::Info,
                format_args!("{device} is no longer a member of this folder; disconnecting it"),
            );
            self.peer_disconnected(device);
            io.disconnect(device);
        }
        let may_edit_now = membership.mode == FolderMode::SendReceive
            && self.membership.mode == FolderMode::ReceiveOnly;
        if list != self.access {
            io.access_changed(&list);
        }
        self.access = list;
        self.membership = membership;
        if may_edit_now {
            self.plan_all(io);
        }
    }
}
