//! What the directory records of a workspace move while it runs: which cells, its epoch, how
//! far it got, and until when the gateway driving it holds it (its lease).
//!
//! The record is what makes a move safe to interrupt. Only one move of a workspace exists at
//! a time; its epoch (one counter for the whole directory, so never reused) goes with every
//! step to the cells, and the directory's switch is a compare-and-set on it and on the
//! workspace's current cell. A gateway that dies mid-move stops renewing the lease; once it
//! ran out, any gateway finishes the move (the directory switched) or undoes it (it did not).

use confab_shared::{CellId, WorkspaceId};
use serde::{Deserialize, Serialize};

/// How long a gateway holds a move it drives without renewing it.
pub const MOVE_LEASE_MS: u64 = 10_000;

/// How far a move got.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MovePhase {
    /// The bulk copy: the source still serves.
    Copying,
    /// The source is frozen; the last changes are being copied.
    Frozen,
    /// The directory points at the target; the source is to be released.
    Switched,
    /// A gateway is undoing the move (it did not switch). Terminal: the record accepts no
    /// other phase any more, and the switch refuses it, so the driver of an attempt that was
    /// given up for dead can never switch behind the undo.
    Undoing,
}

/// A move under way.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MoveRecord {
    pub workspace: WorkspaceId,
    pub from: CellId,
    pub to: CellId,
    /// The target's region: the workspace's region once it switched.
    pub to_region: String,
    /// Set by the directory when the move begins; unique over the directory's life.
    pub epoch: u64,
    pub phase: MovePhase,
    /// Unix ms until which the driving gateway holds the move.
    pub lease_until_ms: u64,
}

/// The outcome of [`crate::Directory::begin_move`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MoveBegun {
    /// This move, with its epoch.
    Started(MoveRecord),
    /// Another move of the workspace is recorded (running, or interrupted).
    Busy(MoveRecord),
    /// No such workspace.
    UnknownWorkspace,
}
