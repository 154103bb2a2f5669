//! Validated ids: strings of 1–64 characters from `[A-Za-z0-9_-]` (SPEC §2), one newtype per
//! kind so that a channel id can never be passed where a user id is expected.
//!
//! Ids are reference-counted (`Arc<str>`): they are cloned into many maps and messages, and a
//! clone must not allocate.

use std::fmt;
use std::sync::Arc;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Longest id the protocol accepts.
pub const MAX_ID_LEN: usize = 64;

/// Why a string is not a valid id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    #[error("id is empty")]
    Empty,
    #[error("id is longer than {MAX_ID_LEN} characters")]
    TooLong,
    #[error("id may only contain A-Z, a-z, 0-9, '_' and '-'")]
    BadCharacter,
}

/// Checks the id syntax of SPEC §2.
pub fn validate_id(s: &str) -> Result<(), IdError> {
    if s.is_empty() {
        return Err(IdError::Empty);
    }
    if s.len() > MAX_ID_LEN {
        return Err(IdError::TooLong);
    }
    if !s
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    {
        return Err(IdError::BadCharacter);
    }
    Ok(())
}

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(Arc<str>);

        impl $name {
            /// Validates `s` and wraps it.
            pub fn new(s: &str) -> Result<Self, IdError> {
                validate_id(s)?;
                Ok(Self(Arc::from(s)))
            }

            /// The id as a string slice.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({:?})", stringify!($name), &*self.0)
            }
        }

        impl std::str::FromStr for $name {
            type Err = IdError;
            fn from_str(s: &str) -> Result<Self, IdError> {
                Self::new(s)
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl std::borrow::Borrow<str> for $name {
            fn borrow(&self) -> &str {
                &self.0
            }
        }

        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(&self.0)
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = std::borrow::Cow::<'de, str>::deserialize(d)?;
                Self::new(&s).map_err(|e| {
                    serde::de::Error::custom(format_args!("invalid {}: {e}", stringify!($name)))
                })
            }
        }
    };
}

id_type!(
    /// A workspace (tenant).
    WorkspaceId
);
id_type!(
    /// A user of one workspace (the token's `sub`).
    UserId
);
id_type!(
    /// A channel of one workspace.
    ChannelId
);
id_type!(
    /// A cell of the deployment.
    CellId
);
id_type!(
    /// One client WebSocket session, unique across the deployment.
    SessionId
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_the_spec_alphabet_up_to_64_characters() {
        assert!(UserId::new("alice_B-9").is_ok());
        assert!(UserId::new(&"a".repeat(64)).is_ok());
    }

    #[test]
    fn rejects_empty_long_and_foreign_characters() {
        assert_eq!(UserId::new(""), Err(IdError::Empty));
        assert_eq!(UserId::new(&"a".repeat(65)), Err(IdError::TooLong));
        assert_eq!(UserId::new("a b"), Err(IdError::BadCharacter));
        assert_eq!(UserId::new("é"), Err(IdError::BadCharacter));
    }

    #[test]
    fn deserialization_validates() {
        assert!(serde_json::from_str::<ChannelId>("\"general\"").is_ok());
        assert!(serde_json::from_str::<ChannelId>("\"gen eral\"").is_err());
        assert!(serde_json::from_str::<ChannelId>("42").is_err());
    }
}
