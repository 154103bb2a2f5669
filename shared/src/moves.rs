//! The vocabulary of a live workspace move (SPEC §7): the steps a gateway asks of the source
//! and target cells over their links, and the pages of raw store keys that travel between them.
//!
//! A move is driven by one gateway. The source cell exports the workspace's keys while it keeps
//! serving ([`MoveOp::ExportBegin`], [`MoveOp::ExportPage`]), then freezes the workspace
//! ([`MoveOp::Freeze`]: writes wait, the store refuses any write of it) and exports only the keys
//! written since ([`MoveOp::ExportDirty`]). The target imports every page
//! ([`MoveOp::ImportBegin`], [`MoveOp::ImportPage`]) and takes the workspace
//! ([`MoveOp::ImportCommit`]); after the directory switch the source lets go
//! ([`MoveOp::Release`]). [`MoveOp::Abort`] and [`MoveOp::ImportAbort`] undo a move that did not
//! switch. Every step carries the move's `epoch`, taken from the directory, so that a step of an
//! older, abandoned attempt cannot act on a newer one.

use serde::{Deserialize, Serialize};

use crate::ids::WorkspaceId;

/// Most keys one export page holds; pages also stop at [`MAX_PAGE_BYTES`].
pub const MAX_PAGE_KEYS: u32 = 512;
/// An export page stops adding keys past this many bytes of dumps (a single larger key still
/// travels alone), well below the link's bound on one message.
pub const MAX_PAGE_BYTES: usize = 4 * 1024 * 1024;

/// One key of a workspace, as the source store serialized it (Redis `DUMP`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyDump {
    /// The full key name; always under the workspace's own prefix.
    pub key: String,
    /// The serialized value; `None` when the key no longer exists (the target deletes it).
    pub dump: Option<Vec<u8>>,
    /// Milliseconds the key has left to live; 0 for a key without expiry.
    pub ttl_ms: u64,
}

/// One page of an export.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyPage {
    pub keys: Vec<KeyDump>,
    /// Where the next page starts; `None` once the export is complete.
    pub next: Option<u64>,
}

/// One step of a move, sent to the source or the target cell as [`crate::link::AdminOp::Move`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum MoveOp {
    /// Source: start recording which keys of the workspace are written (the export runs while
    /// the workspace keeps serving).
    ExportBegin { workspace: WorkspaceId, epoch: u64 },
    /// Source: a page of the workspace's keys, from `cursor` (0 to start).
    ExportPage { workspace: WorkspaceId, cursor: u64 },
    /// Source: stop writes to the workspace. New requests wait in the cell; the store refuses
    /// any write of the workspace from now on, durably, so a restarted cell refuses them too.
    Freeze { workspace: WorkspaceId, epoch: u64 },
    /// Source, frozen: a page of the keys written since `ExportBegin`, from `cursor`.
    ExportDirty { workspace: WorkspaceId, cursor: u64 },
    /// Source, after the directory switched: the workspace is gone. Waiting requests are
    /// answered "moved" (the gateway retries on the new cell), sessions get `4010`, and the
    /// workspace's keys are deleted.
    Release { workspace: WorkspaceId, epoch: u64 },
    /// Source: undo a move that did not switch; the workspace serves again and waiting
    /// requests go on. Refused once the workspace was released.
    Abort { workspace: WorkspaceId, epoch: u64 },
    /// Target: drop anything left of the workspace (an earlier, undone attempt) and get ready.
    ImportBegin { workspace: WorkspaceId, epoch: u64 },
    /// Target: write a page of keys as they are on the source.
    ImportPage {
        workspace: WorkspaceId,
        epoch: u64,
        keys: Vec<KeyDump>,
    },
    /// Target: the copy is complete; serve the workspace.
    ImportCommit { workspace: WorkspaceId, epoch: u64 },
    /// Target: undo an import (the move did not switch); its keys are deleted.
    ImportAbort { workspace: WorkspaceId, epoch: u64 },
}

impl MoveOp {
    /// The step's name, for logs and errors.
    pub fn name(&self) -> &'static str {
        match self {
            MoveOp::ExportBegin { .. } => "export_begin",
            MoveOp::ExportPage { .. } => "export_page",
            MoveOp::Freeze { .. } => "freeze",
            MoveOp::ExportDirty { .. } => "export_dirty",
            MoveOp::Release { .. } => "release",
            MoveOp::Abort { .. } => "abort",
            MoveOp::ImportBegin { .. } => "import_begin",
            MoveOp::ImportPage { .. } => "import_page",
            MoveOp::ImportCommit { .. } => "import_commit",
            MoveOp::ImportAbort { .. } => "import_abort",
        }
    }

    /// The workspace the step is about.
    pub fn workspace(&self) -> &WorkspaceId {
        match self {
            MoveOp::ExportBegin { workspace, .. }
            | MoveOp::ExportPage { workspace, .. }
            | MoveOp::Freeze { workspace, .. }
            | MoveOp::ExportDirty { workspace, .. }
            | MoveOp::Release { workspace, .. }
            | MoveOp::Abort { workspace, .. }
            | MoveOp::ImportBegin { workspace, .. }
            | MoveOp::ImportPage { workspace, .. }
            | MoveOp::ImportCommit { workspace, .. }
            | MoveOp::ImportAbort { workspace, .. } => workspace,
        }
    }
}

/// The prefix every key of `workspace` starts with in a cell store: `confab:cs:{W}:`, the
/// braces a Redis Cluster hash tag, so that all of them are in one slot (ids never hold `:`,
/// `{` or `}`, so no workspace's prefix is another's).
pub fn key_prefix(workspace: &WorkspaceId) -> String {
    format!("confab:cs:{{{workspace}}}:")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::link::{decode, encode, AdminOp, CellReply};

    fn ws(s: &str) -> WorkspaceId {
        WorkspaceId::new(s).unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn move_steps_and_key_pages_round_trip_through_the_link_encoding() {
        let op = AdminOp::Move(MoveOp::ImportPage {
            workspace: ws("acme"),
            epoch: 7,
            keys: vec![
                KeyDump {
                    key: "confab:cs:{acme}:meta".into(),
                    dump: Some(vec![0, 1, 2, 255]),
                    ttl_ms: 0,
                },
                KeyDump {
                    key: "confab:cs:{acme}:ch:x".into(),
                    dump: None,
                    ttl_ms: 5,
                },
            ],
        });
        let back: AdminOp = decode(&encode(&op)).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(back, op);
        let reply = CellReply::Keys(KeyPage {
            keys: Vec::new(),
            next: Some(3),
        });
        let back: CellReply = decode(&encode(&reply)).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(back, reply);
    }

    #[test]
    fn no_workspace_prefix_is_the_prefix_of_another() {
        assert!(!key_prefix(&ws("ab-c")).starts_with(&key_prefix(&ws("ab"))));
        assert_eq!(key_prefix(&ws("ab")), "confab:cs:{ab}:");
    }
}
