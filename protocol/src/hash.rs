//! Content hashes: the names of blocks and manifests.
//!
//! A block is named by the BLAKE3 hash of its bytes. A manifest is named by a BLAKE3
//! hash of its canonical encoding in a separate domain (`derive_key` context), so that
//! a manifest can never be confused with a block of the same bytes.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Length in bytes of every Weft content hash.
pub const HASH_LEN: usize = 32;

macro_rules! content_hash {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(pub [u8; HASH_LEN]);

        // Raw bytes on the wire and on disk; hex in JSON and TOML.
        impl Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                if serializer.is_human_readable() {
                    serializer.serialize_str(&self.to_hex())
                } else {
                    self.0.serialize(serializer)
                }
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                if deserializer.is_human_readable() {
                    let text = String::deserialize(deserializer)?;
                    Self::from_hex(&text).ok_or_else(|| serde::de::Error::custom("expected 64 hex digits"))
                } else {
                    Ok(Self(<[u8; HASH_LEN]>::deserialize(deserializer)?))
                }
            }
        }

        impl $name {
            /// The raw hash bytes.
            pub fn as_bytes(&self) -> &[u8; HASH_LEN] {
                &self.0
            }

            /// Lowercase hex, as shown in logs and the control API.
            pub fn to_hex(&self) -> String {
                data_encoding::HEXLOWER.encode(&self.0)
            }

            /// Parses the lowercase or uppercase hex form.
            pub fn from_hex(text: &str) -> Option<Self> {
                let bytes = data_encoding::HEXLOWER_PERMISSIVE.decode(text.as_bytes()).ok()?;
                Some(Self(bytes.try_into().ok()?))
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.to_hex())
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                // Twelve hex digits identify a hash in a log line without flooding it.
                write!(f, "{}({}…)", stringify!($name), &self.to_hex()[..12])
            }
        }
    };
}

content_hash!(
    /// BLAKE3 hash of a block's bytes; the block's name.
    BlockHash
);
content_hash!(
    /// Hash of a manifest's canonical encoding (see [`crate::manifest`]); its name.
    ManifestHash
);

impl BlockHash {
    /// Hashes one block's bytes.
    pub fn of(data: &[u8]) -> Self {
        Self(*blake3::hash(data).as_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_hash_is_plain_blake3_and_hex_round_trips() {
        let hash = BlockHash::of(b"");
        // BLAKE3 of the empty input, from the BLAKE3 test vectors.
        assert_eq!(
            hash.to_hex(),
            "af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262"
        );
        assert_eq!(BlockHash::from_hex(&hash.to_hex()), Some(hash));
        assert_eq!(BlockHash::from_hex("abc"), None);
        assert_eq!(BlockHash::from_hex(&"zz".repeat(32)), None);
    }
}
