//! Device identity: the ed25519 key pair, the device ID people read and type, and
//! the libp2p `PeerId` derived from the same key.
//!
//! A device is its key. The **device ID** is the 32-byte ed25519 public key written
//! in base32 (RFC 4648 alphabet, no padding: 52 characters), cut into four groups of
//! 13 characters, each followed by one check character (56 characters), shown in
//! eight dash-separated groups of seven:
//!
//! ```text
//! MFRGGZD-FMZTWQ2-LRSXXGM-... (8 groups of 7)
//! ```
//!
//! The layout is Syncthing's. The check character is not: Syncthing uses Luhn mod 32,
//! which misses the transposition of `A` and `7` (their Luhn addends differ by 32).
//! Weft uses a weighted sum over GF(32) (Horner evaluation with the primitive element
//! `x` of GF(2^5) = GF(2)[x]/(x^5 + x^2 + 1)), chosen so that the weighted sum of a
//! valid group is zero. Because every weight is non-zero and `x + 1 != 0`, it detects
//! **every** single-character substitution and **every** transposition of two adjacent
//! characters (including a check character), which the tests check exhaustively.
//!
//! Parsing is forgiving where it is safe: case, dashes and whitespace are ignored, and
//! the look-alikes `0`, `1` and `8` (not in the alphabet) are read as `O`, `I` and `B`.
//! A wrong check character is an error that says which group is wrong.

use std::fmt;
use std::str::FromStr;

use ed25519_dalek::{Signer, SigningKey, VerifyingKey};
use libp2p_identity::PeerId;
use serde::{Deserialize, Serialize};

/// Length of a device ID's text form without separators.
pub const DEVICE_ID_TEXT_LEN: usize = 56;
/// Characters in the short form used in conflict file names (the first display group).
pub const SHORT_ID_LEN: usize = 7;
/// Data characters per check group (52 base32 characters / 4 groups).
const GROUP_DATA_LEN: usize = 13;
/// Characters per display group.
const DISPLAY_GROUP_LEN: usize = 7;
/// RFC 4648 base32 alphabet; the index of a character is its value in GF(32).
const ALPHABET: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
/// First line of a device key file, naming its format.
const KEY_FILE_HEADER: &str = "WEFT DEVICE KEY v1";
/// libp2p's protobuf encoding of an ed25519 public key, before the 32 key bytes:
/// field 1 (key type) = 1 (Ed25519), field 2 (data) of length 32.
const ED25519_PROTOBUF_PREFIX: [u8; 4] = [0x08, 0x01, 0x12, 0x20];

/// Why a device ID (text, bytes or PeerId) was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DeviceIdError {
    /// The text had the wrong number of characters once separators were removed.
    #[error(
        "a device ID has {DEVICE_ID_TEXT_LEN} characters (8 groups of 7), this one has {found}; copy the whole ID"
    )]
    Length {
        /// Characters found, separators not counted.
        found: usize,
    },
    /// A character outside the base32 alphabet.
    #[error("'{character}' cannot appear in a device ID (letters A-Z and digits 2-7 only)")]
    Character {
        /// The offending character.
        character: char,
    },
    /// A check character did not match: a typo in that part of the ID.
    #[error(
        "device ID check failed in characters {first}-{last}: there is a typo there, compare it with the ID shown on the other device"
    )]
    Check {
        /// First character (1-based, separators not counted) of the failing group.
        first: usize,
        /// Last character of the failing group.
        last: usize,
    },
    /// The 32 bytes are not a valid ed25519 public key.
    #[error("the device ID does not name a valid device key")]
    InvalidKey,
    /// A libp2p peer ID that does not carry an inline ed25519 key.
    #[error("the peer ID is not an ed25519 Weft device")]
    NotEd25519Peer,
}

/// A device's identity: its ed25519 public key. Cheap to copy and compare.
///
/// Invariant: the bytes are a valid (decompressible) ed25519 public key.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DeviceId([u8; 32]);

impl DeviceId {
    /// Builds a device ID from public key bytes, checking that they are a valid key.
    pub fn from_bytes(bytes: [u8; 32]) -> Result<Self, DeviceIdError> {
        if !recently_validated(&bytes) {
            VerifyingKey::from_bytes(&bytes).map_err(|_| DeviceIdError::InvalidKey)?;
            remember_validated(bytes);
        }
        Ok(Self(bytes))
    }

    /// The public key bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// The first display group: short enough for file names, long enough (35 bits) to
    /// tell a person's devices apart. Not unique; never use it to identify a device.
    pub fn short(&self) -> String {
        self.to_string()[..SHORT_ID_LEN].to_owned()
    }

    /// Verifies `signature` over `message` by this device (strict ed25519 verification).
    pub fn verify(&self, message: &[u8], signature: &Signature) -> Result<(), SignatureError> {
        let key = VerifyingKey::from_bytes(&self.0).map_err(|_| SignatureError)?;
        let signature = ed25519_dalek::Signature::from_bytes(&signature.0);
        key.verify_strict(message, &signature)
            .map_err(|_| SignatureError)
    }

    /// The libp2p peer ID of this device (same key, so the transport authenticates it).
    ///
    /// Built from the key bytes directly: an ed25519 peer ID is the identity multihash
    /// of the protobuf-encoded key, and going through [`Self::libp2p_public_key`] would
    /// decompress the curve point (tens of microseconds, on every stream opened).
    pub fn to_peer_id(&self) -> PeerId {
        let mut multihash = [0u8; 2 + ED25519_PROTOBUF_PREFIX.len() + 32];
        multihash[..2].copy_from_slice(&[0x00, (ED25519_PROTOBUF_PREFIX.len() + 32) as u8]);
        multihash[2..6].copy_from_slice(&ED25519_PROTOBUF_PREFIX);
        multihash[6..].copy_from_slice(&self.0);
        PeerId::from_bytes(&multihash).unwrap_or_else(|_| self.libp2p_public_key().to_peer_id())
    }

    /// The libp2p public key of this device.
    pub fn libp2p_public_key(&self) -> libp2p_identity::PublicKey {
        match libp2p_identity::ed25519::PublicKey::try_from_bytes(&self.0) {
            Ok(key) => key.into(),
            // Unreachable by the type's invariant; kept total without a panic.
            Err(_) => unreachable_key(),
        }
    }

    /// The device behind a libp2p peer ID, if it is an ed25519 key inlined in the ID.
    pub fn try_from_peer_id(peer: &PeerId) -> Result<Self, DeviceIdError> {
        let multihash = peer.as_ref();
        // Code 0 is the identity multihash: the digest is the protobuf-encoded key.
        if multihash.code() != 0 {
            return Err(DeviceIdError::NotEd25519Peer);
        }
        // The digest is the protobuf-encoded key: type Ed25519, then 32 key bytes.
        let key = multihash
            .digest()
            .strip_prefix(&ED25519_PROTOBUF_PREFIX[..])
            .and_then(|key| <[u8; 32]>::try_from(key).ok())
            .ok_or(DeviceIdError::NotEd25519Peer)?;
        Self::from_bytes(key)
    }

    fn encode_text(&self) -> [u8; DEVICE_ID_TEXT_LEN] {
        let data = data_encoding::BASE32_NOPAD.encode(&self.0);
        let data = data.as_bytes();
        let mut text = [0u8; DEVICE_ID_TEXT_LEN];
        for (group, chunk) in data.chunks(GROUP_DATA_LEN).enumerate() {
            let start = group * (GROUP_DATA_LEN + 1);
            text[start..start + GROUP_DATA_LEN].copy_from_slice(chunk);
            let values = chunk.iter().map(|&c| char_value(c).unwrap_or(0));
            text[start + GROUP_DATA_LEN] = ALPHABET[usize::from(check_value(values))];
        }
        text
    }
}

/// How many validated keys each thread remembers.
const VALIDATED_KEYS: usize = 8;

thread_local! {
    /// The keys this thread validated last, most recent first. Checking a key
    /// decompresses a curve point (a field square root): decoding a folder's document
    /// or its stored rows checks the same few authors' keys for every entry, which was
    /// 2% of both nodes' CPU in an initial sync of the bench dataset (perf at 145fce8,
    /// 2026-12-03, AMD EPYC host).
    static VALIDATED: std::cell::RefCell<Vec<[u8; 32]>> =
        const { std::cell::RefCell::new(Vec::new()) };
}

/// True if this thread validated `bytes` as a key among its last [`VALIDATED_KEYS`].
fn recently_validated(bytes: &[u8; 32]) -> bool {
    VALIDATED.with(|keys| keys.borrow().iter().any(|key| key == bytes))
}

/// Remembers `bytes` as a valid key (only ever called after the check passed).
fn remember_validated(bytes: [u8; 32]) {
    VALIDATED.with(|keys| {
        let mut keys = keys.borrow_mut();
        keys.insert(0, bytes);
        keys.truncate(VALIDATED_KEYS);
    });
}

#[cold]
fn unreachable_key() -> libp2p_identity::PublicKey {
    // A DeviceId always holds a key that `VerifyingKey::from_bytes` accepted, which is
    // the same check libp2p makes. Fall back to a fixed valid key rather than panic.
    let key = SigningKey::from_bytes(&[0u8; 32])
        .verifying_key()
        .to_bytes();
    match libp2p_identity::ed25519::PublicKey::try_from_bytes(&key) {
        Ok(key) => key.into(),
        Err(_) => unreachable_key(),
    }
}

/// Multiplies by `x` in GF(2^5) = GF(2)[x]/(x^5 + x^2 + 1).
fn gf32_times_x(value: u8) -> u8 {
    let shifted = value << 1;
    if shifted & 0b10_0000 != 0 {
        shifted ^ 0b10_0101
    } else {
        shifted
    }
}

/// Horner evaluation of the characters' values as a polynomial in `x` over GF(32).
fn weighted_sum(values: impl Iterator<Item = u8>) -> u8 {
    values.fold(0, |acc, value| gf32_times_x(acc) ^ value)
}

/// The check value that makes the weighted sum of (data, check) zero.
fn check_value(values: impl Iterator<Item = u8>) -> u8 {
    gf32_times_x(weighted_sum(values))
}

fn char_value(c: u8) -> Option<u8> {
    match c {
        b'A'..=b'Z' => Some(c - b'A'),
        b'2'..=b'7' => Some(c - b'2' + 26),
        _ => None,
    }
}

impl fmt::Display for DeviceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let text = self.encode_text();
        for (index, group) in text.chunks(DISPLAY_GROUP_LEN).enumerate() {
            if index > 0 {
                f.write_str("-")?;
            }
            // The text is ASCII from ALPHABET.
            f.write_str(std::str::from_utf8(group).map_err(|_| fmt::Error)?)?;
        }
        Ok(())
    }
}

impl fmt::Debug for DeviceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DeviceId({})", self.short())
    }
}

impl FromStr for DeviceId {
    type Err = DeviceIdError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let mut values = Vec::with_capacity(DEVICE_ID_TEXT_LEN);
        for character in text.chars() {
            if character == '-' || character.is_whitespace() {
                continue;
            }
            let normalised = match character.to_ascii_uppercase() {
                '0' => 'O',
                '1' => 'I',
                '8' => 'B',
                other => other,
            };
            let value = u8::try_from(normalised)
                .ok()
                .and_then(char_value)
                .ok_or(DeviceIdError::Character { character })?;
            values.push(value);
        }
        if values.len() != DEVICE_ID_TEXT_LEN {
            return Err(DeviceIdError::Length {
                found: values.len(),
            });
        }
        let mut data = Vec::with_capacity(GROUP_DATA_LEN * 4);
        for (group, chunk) in values.chunks(GROUP_DATA_LEN + 1).enumerate() {
            if weighted_sum(chunk.iter().copied()) != 0 {
                let first = group * (GROUP_DATA_LEN + 1) + 1;
                return Err(DeviceIdError::Check {
                    first,
                    last: first + GROUP_DATA_LEN,
                });
            }
            data.extend(
                chunk[..GROUP_DATA_LEN]
                    .iter()
                    .map(|&v| ALPHABET[usize::from(v)]),
            );
        }
        // Non-zero padding bits in the last character are rejected here too.
        let bytes = data_encoding::BASE32_NOPAD
            .decode(&data)
            .map_err(|_| DeviceIdError::InvalidKey)?;
        let bytes: [u8; 32] = bytes.try_into().map_err(|_| DeviceIdError::InvalidKey)?;
        Self::from_bytes(bytes)
    }
}

impl Serialize for DeviceId {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        if serializer.is_human_readable() {
            serializer.collect_str(self)
        } else {
            self.0.serialize(serializer)
        }
    }
}

impl<'de> Deserialize<'de> for DeviceId {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        if deserializer.is_human_readable() {
            let text = String::deserialize(deserializer)?;
            text.parse().map_err(serde::de::Error::custom)
        } else {
            let bytes = <[u8; 32]>::deserialize(deserializer)?;
            Self::from_bytes(bytes).map_err(serde::de::Error::custom)
        }
    }
}

/// An ed25519 signature by a device.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Signature(pub [u8; 64]);

impl fmt::Debug for Signature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Signature({}…)",
            data_encoding::HEXLOWER.encode(&self.0[..8])
        )
    }
}

impl Serialize for Signature {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serde_bytes::Bytes::new(&self.0).serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for Signature {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let bytes = serde_bytes::ByteBuf::deserialize(deserializer)?;
        let bytes: [u8; 64] = bytes
            .into_vec()
            .try_into()
            .map_err(|_| serde::de::Error::custom("a signature has 64 bytes"))?;
        Ok(Self(bytes))
    }
}

/// A signature did not verify for the claimed device and message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("signature does not verify for this device and message")]
pub struct SignatureError;

/// Why a device key file was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum KeyFileError {
    /// The first line is not the expected header.
    #[error("not a Weft device key file (first line must be '{KEY_FILE_HEADER}')")]
    Header,
    /// The key line is not 64 hex digits.
    #[error("the device key file is damaged: expected 64 hex digits on its second line")]
    Key,
}

/// A device's secret key. Never leaves the device; the node keeps it in a file of mode 0600.
pub struct DeviceKey {
    signing: SigningKey,
}

impl DeviceKey {
    /// Builds the key from 32 secret bytes (the caller supplies randomness: this crate
    /// does no I/O).
    pub fn from_secret_bytes(secret: [u8; 32]) -> Self {
        Self {
            signing: SigningKey::from_bytes(&secret),
        }
    }

    /// This device's ID.
    pub fn device_id(&self) -> DeviceId {
        DeviceId(self.signing.verifying_key().to_bytes())
    }

    /// Signs `message`.
    pub fn sign(&self, message: &[u8]) -> Signature {
        Signature(self.signing.sign(message).to_bytes())
    }

    /// The same key as a libp2p key pair, so that the libp2p `PeerId` is this device.
    pub fn to_libp2p_keypair(&self) -> Result<libp2p_identity::Keypair, KeyFileError> {
        // libp2p accepts any 32 bytes as an ed25519 secret; the error arm is defensive.
        libp2p_identity::Keypair::ed25519_from_bytes(self.signing.to_bytes())
            .map_err(|_| KeyFileError::Key)
    }

    /// The key file's text: a header line and the secret key in hex.
    pub fn to_key_file(&self) -> String {
        format!(
            "{KEY_FILE_HEADER}\n{}\n",
            data_encoding::HEXLOWER.encode(self.signing.as_bytes())
        )
    }

    /// Parses a key file written by [`DeviceKey::to_key_file`].
    pub fn from_key_file(text: &str) -> Result<Self, KeyFileError> {
        let mut lines = text.lines();
        if lines.next().map(str::trim) != Some(KEY_FILE_HEADER) {
            return Err(KeyFileError::Header);
        }
        let hex = lines.next().map(str::trim).ok_or(KeyFileError::Key)?;
        let bytes = data_encoding::HEXLOWER_PERMISSIVE
            .decode(hex.as_bytes())
            .map_err(|_| KeyFileError::Key)?;
        let secret: [u8; 32] = bytes.try_into().map_err(|_| KeyFileError::Key)?;
        Ok(Self::from_secret_bytes(secret))
    }
}

impl fmt::Debug for DeviceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print the secret.
        write!(f, "DeviceKey({:?})", self.device_id())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn key(seed: u8) -> DeviceKey {
        DeviceKey::from_secret_bytes([seed; 32])
    }

    /// Golden: pins the text form of a fixed key. Changing it breaks every ID users hold.
    #[test]
    fn text_form_of_fixed_key_is_pinned() {
        let id = key(7).device_id();
        assert_eq!(
            id.to_string(),
            "5JFGYY7-CTRJAVX-PXVKB5R-GLWF7GZ-KUO5VOX-27HXESM-CD3VGSF-CG2IWAE"
        );
        assert_eq!(id.short(), "5JFGYY7");
    }

    #[test]
    fn every_single_substitution_is_rejected() {
        let text: Vec<u8> = key(7).device_id().encode_text().to_vec();
        for position in 0..text.len() {
            for &replacement in ALPHABET {
                if replacement == text[position] {
                    continue;
                }
                let mut typo = text.clone();
                typo[position] = replacement;
                let typo = String::from_utf8(typo).unwrap();
                assert!(
                    typo.parse::<DeviceId>().is_err(),
                    "substitution at {position} by {} accepted: {typo}",
                    replacement as char
                );
            }
        }
    }

    #[test]
    fn every_adjacent_swap_is_rejected() {
        // Several IDs, so that the A<->7 swap that defeats Luhn mod 32 shows up too.
        let mut swaps = 0;
        for seed in 0..64 {
            let text: Vec<u8> = key(seed).device_id().encode_text().to_vec();
            for position in 0..text.len() - 1 {
                if text[position] == text[position + 1] {
                    continue;
                }
                let mut typo = text.clone();
                typo.swap(position, position + 1);
                let typo = String::from_utf8(typo).unwrap();
                assert!(typo.parse::<DeviceId>().is_err(), "swap accepted: {typo}");
                swaps += 1;
            }
        }
        assert!(swaps > 3000);
    }

    #[test]
    fn the_luhn_blind_spot_is_covered() {
        // Luhn mod 32 gives 'A' (0) and '7' (31) the same contribution difference;
        // the GF(32) check must still tell "A7" from "7A".
        let a = [0u8, 31].into_iter();
        let b = [31u8, 0].into_iter();
        assert_ne!(weighted_sum(a), weighted_sum(b));
    }

    #[test]
    fn parsing_is_forgiving_where_safe() {
        let id = key(7).device_id();
        let text = id.to_string();
        let lower = text.to_lowercase();
        assert_eq!(lower.parse::<DeviceId>(), Ok(id));
        let spaced = text.replace('-', " ");
        assert_eq!(spaced.parse::<DeviceId>(), Ok(id));
        let compact = text.replace('-', "");
        assert_eq!(compact.parse::<DeviceId>(), Ok(id));
        // Look-alikes: O->0, I->1, B->8.
        let lookalike = text.replace('O', "0").replace('I', "1").replace('B', "8");
        assert_eq!(lookalike.parse::<DeviceId>(), Ok(id));
    }

    #[test]
    fn errors_say_what_is_wrong() {
        let text = key(7).device_id().to_string();
        assert_eq!(
            text[..20].parse::<DeviceId>(),
            Err(DeviceIdError::Length { found: 18 })
        );
        let bad_char = text.replacen('R', "9", 1);
        assert!(matches!(
            bad_char.parse::<DeviceId>(),
            Err(DeviceIdError::Character { character: '9' })
        ));
        // A typo in the third group is reported there.
        let mut chars: Vec<char> = text.chars().collect();
        let position = 2 * 8 + 5; // display position inside characters 29..42
        chars[position] = if chars[position] == 'A' { 'B' } else { 'A' };
        let typo: String = chars.into_iter().collect();
        assert_eq!(
            typo.parse::<DeviceId>(),
            Err(DeviceIdError::Check {
                first: 15,
                last: 28
            })
        );
        let error = DeviceIdError::Check {
            first: 15,
            last: 28,
        };
        assert!(error.to_string().contains("typo"));
    }

    #[test]
    fn invalid_key_bytes_are_rejected() {
        // Not every 32-byte string is a point on the curve; find one that is not.
        let invalid = (0u8..=255)
            .map(|b| [b; 32])
            .find(|bytes| VerifyingKey::from_bytes(bytes).is_err())
            .unwrap();
        assert_eq!(
            DeviceId::from_bytes(invalid),
            Err(DeviceIdError::InvalidKey)
        );
        // Valid keys checked before (remembered, more than the thread keeps) do not
        // let it through, nor does it push a valid key out of the remembered ones.
        let valid: Vec<[u8; 32]> = (0..VALIDATED_KEYS as u8 + 3)
            .map(|seed| *key(seed).device_id().as_bytes())
            .collect();
        for _ in 0..2 {
            for bytes in &valid {
                assert_eq!(
                    DeviceId::from_bytes(*bytes).map(|id| *id.as_bytes()),
                    Ok(*bytes)
                );
                assert!(recently_validated(bytes));
                assert_eq!(
                    DeviceId::from_bytes(invalid),
                    Err(DeviceIdError::InvalidKey)
                );
            }
        }
        assert!(!recently_validated(&invalid));
        assert!(!recently_validated(&valid[0]), "only the last few are kept");
    }

    #[test]
    fn peer_ids_without_an_inline_ed25519_key_are_rejected() {
        // A sha2-256 multihash peer ID (what RSA keys use) carries no key to recover.
        let mut bytes = vec![0x12, 0x20];
        bytes.extend_from_slice(&[5u8; 32]);
        let peer = PeerId::from_bytes(&bytes).unwrap();
        assert_eq!(
            DeviceId::try_from_peer_id(&peer),
            Err(DeviceIdError::NotEd25519Peer)
        );
    }

    #[test]
    fn key_file_round_trips_and_rejects_damage() {
        let original = key(9);
        let text = original.to_key_file();
        let parsed = DeviceKey::from_key_file(&text).unwrap();
        assert_eq!(parsed.device_id(), original.device_id());
        assert_eq!(
            DeviceKey::from_key_file("hello\n").unwrap_err(),
            KeyFileError::Header
        );
        let damaged = text.replace(&text[20..24], "zzzz");
        assert_eq!(
            DeviceKey::from_key_file(&damaged).unwrap_err(),
            KeyFileError::Key
        );
    }

    #[test]
    fn signatures_verify_only_for_signer_and_message() {
        let signer = key(1);
        let other = key(2);
        let signature = signer.sign(b"change");
        assert!(signer.device_id().verify(b"change", &signature).is_ok());
        assert!(signer.device_id().verify(b"chang3", &signature).is_err());
        assert!(other.device_id().verify(b"change", &signature).is_err());
    }

    proptest! {
        #[test]
        fn text_and_peer_id_round_trip(secret in any::<[u8; 32]>()) {
            let device_key = DeviceKey::from_secret_bytes(secret);
            let id = device_key.device_id();
            prop_assert_eq!(id.to_string().parse::<DeviceId>(), Ok(id));
            let peer = id.to_peer_id();
            prop_assert_eq!(peer, device_key.to_libp2p_keypair().unwrap().public().to_peer_id());
            prop_assert_eq!(DeviceId::try_from_peer_id(&peer), Ok(id));
            let bytes = postcard::to_allocvec(&id).unwrap();
            prop_assert_eq!(postcard::from_bytes::<DeviceId>(&bytes).unwrap(), id);
        }

        #[test]
        fn parsing_never_panics(text in ".{0,80}") {
            let _ = text.parse::<DeviceId>();
        }
    }
}
