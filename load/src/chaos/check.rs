//! The verdict of a chaos run, computed from every client's log alone.
//!
//! For every channel, the acked messages are the truth: each acked `client_msg_id` must have one
//! seq (a retried send is stored once and acked with that seq every time), each seq one message,
//! and every member must have received every seq after the one it started from (its first
//! `ready`) up to the channel's last, exactly once and in increasing order, across all of its
//! connections.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use serde::{Deserialize, Serialize};

/// One line of a client's log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Entry {
    /// A connection's `ready`: the channels and their `last_seq`; `resumed` when it said
    /// `hello` with a `resume` map.
    Ready {
        session: String,
        resumed: bool,
        channels: Vec<(String, u64)>,
    },
    /// An `ack` of a send.
    Ack {
        channel: String,
        seq: u64,
        client_msg_id: String,
    },
    /// A channel event with a seq (`message` or another log event).
    Event {
        channel: String,
        seq: u64,
        #[serde(rename = "type")]
        kind: String,
        client_msg_id: Option<String>,
    },
    /// A `resync` event: the server could not replay a gap.
    Resync { channel: String },
    /// A send written (again) on the socket.
    Send {
        channel: String,
        client_msg_id: String,
        attempt: u32,
    },
    /// An error answering a send; the send is retried with the same `client_msg_id`.
    SendError { client_msg_id: String, code: String },
    /// The connection ended or could not be opened.
    Disconnect { reason: String },
}

/// A timestamped [`Entry`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Line {
    /// Milliseconds since the run started.
    pub t_ms: u64,
    #[serde(flatten)]
    pub entry: Entry,
}

/// One client's whole log.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ClientLog {
    pub user: String,
    /// The channels this user is a member of for the whole run.
    pub channels: Vec<String>,
    pub lines: Vec<Line>,
}

/// What the logs say, summed over clients and channels.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Verdict {
    /// Distinct `client_msg_id`s acked.
    pub acked: u64,
    /// Sends written on a socket, retries included.
    pub send_attempts: u64,
    /// Errors answering sends (each followed by a retry).
    pub send_errors: u64,
    /// Connections that reached `ready`.
    pub readies: u64,
    /// Connections that ended (or failed to open) and were reopened.
    pub disconnects: u64,
    /// Distinct (member, channel, seq) deliveries.
    pub delivered: u64,
    /// Deliveries every member should have had: for each member and channel, the seqs after
    /// its start up to the channel's last.
    pub expected: u64,
    /// Expected deliveries that never came (acked messages among them in `lost_acked`).
    pub lost: u64,
    pub lost_acked: u64,
    /// Deliveries received more than once by the same member.
    pub duplicates: u64,
    /// Deliveries received after a higher seq of the same channel.
    pub reordered: u64,
    /// A `client_msg_id` acked with two seqs, two ids acked with one seq, or an event whose
    /// message differs from the one acked at its seq: a send stored twice or a seq reused.
    pub conflicts: u64,
    pub resyncs: u64,
    /// The first few problems, for humans.
    pub problems: Vec<String>,
}

impl Verdict {
    /// Nothing lost, duplicated, reordered or stored twice.
    pub fn clean(&self) -> bool {
        self.lost == 0
            && self.duplicates == 0
            && self.reordered == 0
            && self.conflicts == 0
            && self.resyncs == 0
    }

    fn problem(&mut self, text: String) {
        if self.problems.len() < 20 {
            self.problems.push(text);
        }
    }
}

/// Judges a run from its clients' logs.
pub fn check(logs: &[ClientLog]) -> Verdict {
    let mut v = Verdict::default();
    // channel -> client_msg_id -> seq, and channel -> seq -> client_msg_id, from acks.
    let mut acked_seq: HashMap<&str, HashMap<&str, u64>> = HashMap::new();
    let mut acked_id: HashMap<&str, BTreeMap<u64, &str>> = HashMap::new();
    let mut last_seq: HashMap<&str, u64> = HashMap::new();
    for log in logs {
        for line in &log.lines {
            match &line.entry {
                Entry::Ack {
                    channel,
                    seq,
                    client_msg_id,
                } => {
                    let by_id = acked_seq.entry(channel).or_default();
                    match by_id.get(client_msg_id.as_str()) {
                        Some(first) if first != seq => {
                            v.conflicts += 1;
                            v.problem(format!(
                                "{channel}: {client_msg_id} acked with seq {first} and {seq}"
                            ));
                        }
                        Some(_) => {}
                        None => {
                            by_id.insert(client_msg_id, *seq);
                        }
                    }
                    let by_seq = acked_id.entry(channel).or_default();
                    match by_seq.get(seq) {
                        Some(first) if first != client_msg_id => {
                            v.conflicts += 1;
                            v.problem(format!(
                                "{channel}: seq {seq} acked for {first} and {client_msg_id}"
                            ));
                        }
                        Some(_) => {}
                        None => {
                            by_seq.insert(*seq, client_msg_id);
                        }
                    }
                    let last = last_seq.entry(channel).or_default();
                    *last = (*last).max(*seq);
                }
                Entry::Event { channel, seq, .. } => {
                    let last = last_seq.entry(channel).or_default();
                    *last = (*last).max(*seq);
                }
                Entry::Send { .. } => v.send_attempts += 1,
                Entry::SendError { .. } => v.send_errors += 1,
                Entry::Ready { .. } => v.readies += 1,
                Entry::Disconnect { .. } => v.disconnects += 1,
                Entry::Resync { channel } => {
                    v.resyncs += 1;
                    v.problem(format!("{}: resync in {channel}", log.user));
                }
            }
        }
    }
    v.acked = acked_seq.values().map(|m| m.len() as u64).sum();
    // The message each seq carries, as delivered, must be the one acked there; and one
    // client_msg_id must not be stored at two seqs.
    let mut stored_at: HashMap<(&str, &str), u64> = HashMap::new();
    for log in logs {
        for line in &log.lines {
            let Entry::Event {
                channel,
                seq,
                client_msg_id: Some(id),
                ..
            } = &line.entry
            else {
                continue;
            };
            if let Some(acked) = acked_id.get(channel.as_str()).and_then(|m| m.get(seq)) {
                if acked != id {
                    v.conflicts += 1;
                    v.problem(format!(
                        "{channel}: seq {seq} delivered as {id} but acked as {acked}"
                    ));
                }
            }
            match stored_at.get(&(channel.as_str(), id.as_str())) {
                Some(first) if first != seq => {
                    v.conflicts += 1;
                    v.problem(format!(
                        "{channel}: {id} stored twice, at seq {first} and {seq}"
                    ));
                }
                Some(_) => {}
                None => {
                    stored_at.insert((channel, id), *seq);
                }
            }
        }
    }
    for log in logs {
        check_member(log, &acked_id, &last_seq, &mut v);
    }
    v
}

fn check_member(
    log: &ClientLog,
    acked_id: &HashMap<&str, BTreeMap<u64, &str>>,
    last_seq: &HashMap<&str, u64>,
    v: &mut Verdict,
) {
    // Where this member started in each channel: its first `ready`.
    let start: HashMap<&str, u64> = log
        .lines
        .iter()
        .find_map(|l| match &l.entry {
            Entry::Ready { channels, .. } => {
                Some(channels.iter().map(|(c, s)| (c.as_str(), *s)).collect())
            }
            _ => None,
        })
        .unwrap_or_default();
    for channel in &log.channels {
        let channel = channel.as_str();
        let from = start.get(channel).copied().unwrap_or(0);
        let last = last_seq.get(channel).copied().unwrap_or(0);
        let mut seen = BTreeSet::new();
        let mut highest = from;
        for line in &log.lines {
            let Entry::Event {
                channel: c, seq, ..
            } = &line.entry
            else {
                continue;
            };
            if c != channel {
                continue;
            }
            let seq = *seq;
            if seq <= from || !seen.insert(seq) {
                v.duplicates += 1;
                v.problem(format!("{}: {channel} seq {seq} received again", log.user));
                continue;
            }
            if seq < highest {
                v.reordered += 1;
                v.problem(format!(
                    "{}: {channel} seq {seq} received after {highest}",
                    log.user
                ));
            }
            highest = highest.max(seq);
        }
        v.delivered += seen.len() as u64;
        v.expected += last.saturating_sub(from);
        let acked = acked_id.get(channel);
        for seq in from + 1..=last {
            if seen.contains(&seq) {
                continue;
            }
            v.lost += 1;
            match acked.and_then(|m| m.get(&seq)) {
                Some(id) => {
                    v.lost_acked += 1;
                    v.problem(format!(
                        "{}: {channel} seq {seq} ({id}, acked) never received",
                        log.user
                    ));
                }
                None => v.problem(format!("{}: {channel} seq {seq} never received", log.user)),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(entry: Entry) -> Line {
        Line { t_ms: 0, entry }
    }

    fn ready(last: u64) -> Line {
        line(Entry::Ready {
            session: "s".into(),
            resumed: false,
            channels: vec![("c".into(), last)],
        })
    }

    fn ack(seq: u64, id: &str) -> Line {
        line(Entry::Ack {
            channel: "c".into(),
            seq,
            client_msg_id: id.into(),
        })
    }

    fn event(seq: u64, id: &str) -> Line {
        line(Entry::Event {
            channel: "c".into(),
            seq,
            kind: "message".into(),
            client_msg_id: Some(id.into()),
        })
    }

    fn log(user: &str, lines: Vec<Line>) -> ClientLog {
        ClientLog {
            user: user.into(),
            channels: vec!["c".into()],
            lines,
        }
    }

    #[test]
    fn every_acked_message_once_in_order_is_clean() {
        let a = log(
            "a",
            vec![ready(2), ack(3, "a-1"), event(3, "a-1"), event(4, "b-1")],
        );
        let b = log(
            "b",
            vec![
                ready(2),
                event(3, "a-1"),
                line(Entry::Disconnect { reason: "x".into() }),
                ready(3),
                ack(4, "b-1"),
                event(4, "b-1"),
            ],
        );
        let v = check(&[a, b]);
        assert!(v.clean(), "{v:?}");
        assert_eq!((v.acked, v.delivered, v.expected), (2, 4, 4));
        assert_eq!(v.disconnects, 1);
    }

    #[test]
    fn a_member_missing_an_acked_message_is_a_loss() {
        let a = log(
            "a",
            vec![ready(0), ack(1, "a-1"), ack(2, "a-2"), event(2, "a-2")],
        );
        let v = check(&[a]);
        assert_eq!((v.lost, v.lost_acked), (1, 1));
        assert!(!v.clean());
    }

    #[test]
    fn a_replayed_seq_is_a_duplicate_and_a_late_one_a_reorder() {
        let a = log(
            "a",
            vec![
                ready(0),
                ack(1, "a-1"),
                ack(2, "a-2"),
                event(2, "a-2"),
                event(1, "a-1"),
                event(2, "a-2"),
            ],
        );
        let v = check(&[a]);
        assert_eq!((v.duplicates, v.reordered, v.lost), (1, 1, 0));
    }

    #[test]
    fn a_retried_send_stored_twice_is_a_conflict() {
        let a = log(
            "a",
            vec![
                ready(0),
                ack(1, "a-1"),
                event(1, "a-1"),
                event(2, "a-1"),
                ack(2, "a-1"),
            ],
        );
        let v = check(&[a]);
        assert!(v.conflicts >= 2, "{v:?}");
        assert!(!v.clean());
    }

    #[test]
    fn a_gap_below_the_last_seq_is_a_loss_even_unacked() {
        let a = log("a", vec![ready(0), event(1, "x"), event(3, "y")]);
        let v = check(&[a]);
        assert_eq!((v.lost, v.lost_acked, v.reordered), (1, 0, 0));
    }
}
