//! Automerge actor IDs of Weft devices: the 32-byte device ID, then a random suffix
//! chosen when a device's store is created (DESIGN.md: a device that lost its store
//! must never reuse sequence numbers its peers already hold). The device an actor
//! names is the author every change signature and access check is about.

use automerge::ActorId;

use crate::identity::DeviceId;

/// Bytes of random suffix in an actor ID after the device ID.
pub const ACTOR_SUFFIX_LEN: usize = 8;

/// The actor ID of a device's store: device ID bytes then a random suffix.
pub fn actor_id(device: &DeviceId, suffix: [u8; ACTOR_SUFFIX_LEN]) -> ActorId {
    let mut bytes = device.as_bytes().to_vec();
    bytes.extend_from_slice(&suffix);
    ActorId::from(bytes)
}

/// The device an actor ID belongs to, if it follows Weft's actor layout.
pub fn actor_device(actor: &ActorId) -> Option<DeviceId> {
    let bytes = actor.to_bytes();
    if bytes.len() != 32 + ACTOR_SUFFIX_LEN {
        return None;
    }
    let key: [u8; 32] = bytes[..32].try_into().ok()?;
    DeviceId::from_bytes(key).ok()
}
