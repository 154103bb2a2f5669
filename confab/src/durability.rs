//! The durability check a cell runs on its store before it serves: an event is acked only
//! after the store returned, so an ack means "on disk" only if the store fsyncs what it
//! appends. Redis does that with `appendonly yes` and `appendfsync always`; `everysec` may lose
//! up to a second of acked events on a crash, and is accepted only when the operator says so
//! with `--store-fsync everysec`. Where Redis refuses `CONFIG GET` (managed Redis), the flag is
//! the operator's word for what the store does, and an unset flag refuses to start.

use confab_cells::store::Persistence;

/// What `--store-fsync` states of the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum StoreFsync {
    /// The store fsyncs every write (`appendonly yes`, `appendfsync always`).
    Always,
    /// The store fsyncs once a second (`appendfsync everysec`): up to a second of acked events
    /// may be lost on a crash of the store's host.
    Everysec,
}

/// The check passed; `warning` is set when the cell runs with a weaker guarantee than
/// "every acked event is on disk", or on the operator's word alone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Accepted {
    pub warning: Option<String>,
}

/// Decides whether a cell may serve from a store with these settings, given what the
/// operator stated (`None`: nothing, so the settings must be verified as `always`). The error
/// is the message the cell exits with.
pub fn check(persistence: &Persistence, stated: Option<StoreFsync>) -> Result<Accepted, String> {
    let (appendonly, appendfsync) = match persistence {
        Persistence::Known {
            appendonly,
            appendfsync,
        } => (*appendonly, appendfsync.as_str()),
        Persistence::Unknown(why) => {
            return match stated {
                None => Err(format!(
                    "the store's persistence settings cannot be read ({why}); if it fsyncs every \
                     write, say so with --store-fsync always (or --store-fsync everysec if it \
                     fsyncs once a second)"
                )),
                Some(StoreFsync::Always) => Ok(Accepted {
                    warning: Some(format!(
                        "the store's persistence settings cannot be read ({why}); trusting \
                         --store-fsync always"
                    )),
                }),
                Some(StoreFsync::Everysec) => Ok(Accepted {
                    warning: Some(format!(
                        "the store's persistence settings cannot be read ({why}); trusting \
                         --store-fsync everysec: up to a second of acked events may be lost"
                    )),
                }),
            };
        }
    };
    if !appendonly {
        return Err(
            "the store runs with appendonly no: acked events would be lost on a restart; \
             set appendonly yes and appendfsync always"
                .into(),
        );
    }
    match (appendfsync, stated) {
        ("always", _) => Ok(Accepted { warning: None }),
        ("everysec", Some(StoreFsync::Everysec)) => Ok(Accepted {
            warning: Some(
                "the store runs with appendfsync everysec (accepted by --store-fsync everysec): \
                 up to a second of acked events may be lost"
                    .into(),
            ),
        }),
        ("everysec", _) => Err(
            "the store runs with appendfsync everysec: up to a second of acked events may be \
             lost; set appendfsync always, or accept it with --store-fsync everysec"
                .into(),
        ),
        (other, _) => Err(format!(
            "the store runs with appendfsync {other}: acked events may be lost; set \
             appendfsync always"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn known(appendonly: bool, appendfsync: &str) -> Persistence {
        Persistence::Known {
            appendonly,
            appendfsync: appendfsync.into(),
        }
    }

    #[test]
    fn always_is_required_unless_everysec_is_stated() {
        assert_eq!(
            check(&known(true, "always"), None),
            Ok(Accepted { warning: None })
        );
        assert!(check(&known(true, "everysec"), None).is_err());
        assert!(check(&known(true, "everysec"), Some(StoreFsync::Always)).is_err());
        assert!(check(&known(true, "everysec"), Some(StoreFsync::Everysec))
            .is_ok_and(|a| a.warning.is_some()));
        assert!(check(&known(true, "no"), Some(StoreFsync::Everysec)).is_err());
        assert!(check(&known(false, "always"), Some(StoreFsync::Everysec)).is_err());
    }

    #[test]
    fn unreadable_settings_need_the_operators_word() {
        let unknown = Persistence::Unknown("unknown command".into());
        assert!(check(&unknown, None).is_err());
        assert!(check(&unknown, Some(StoreFsync::Always)).is_ok());
        assert!(check(&unknown, Some(StoreFsync::Everysec)).is_ok());
    }
}
