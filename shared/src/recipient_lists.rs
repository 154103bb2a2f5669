//! Recipient lists sent once per link: how a cell→gateway link carries a channel's fanout
//! without repeating its recipients in every event.
//!
//! A channel's `Deliver` names every session of the gateway that must receive the event. A cell
//! keeps that list as one cached `Arc<[SessionId]>` per channel and gateway, rebuilt only when
//! subscriptions change (`confab_cells::fanout`), so in-process (`confab dev`) a delivery
//! passes the same list along for free. Over a link, sending the list with every event made
//! each event cost the cell an encoding and the gateway a decoding, validation and allocation
//! per recipient: most of a distributed gateway's own CPU at a channel of 1,000.
//!
//! So the cell's link writer ([`ListEncoder`]) sends a list the first time it carries it
//! ([`Incoming::Recipients`], with a number the link has not used) and then only its number
//! ([`Incoming::DeliverTo`]); once the cell dropped the list (subscriptions changed, and every
//! delivery using it is written) the writer tells the gateway to forget the number
//! ([`Incoming::Forget`]). The gateway's link reader ([`ListDecoder`]) keeps the lists it was
//! sent and turns each `DeliverTo` back into the `ToGateway::Deliver` the rest of the gateway
//! knows, with the same shared list every time, so everything past the reader is unchanged.
//!
//! Only a list someone else still holds (the channel's cache) is worth a number; a list built
//! for one delivery (typing, which leaves the typist out; a user's own `channel_added`) travels
//! inline as before. A link's messages arrive in the order they were written, so a list always
//! arrives before its first use and is forgotten after its last. Both ends bound the lists a
//! link holds ([`MAX_LISTS`]); a cell past the bound sends lists inline, and a gateway sent
//! more than the bound (or an unknown number) gives the link up as broken.

use std::collections::HashMap;
use std::sync::{Arc, Weak};

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::ids::SessionId;
use crate::link::{Frame, FrameWriter, MessageTooLarge, ToGateway};

/// The most recipient lists one link holds at once. A cell holds one per channel with
/// subscribers on the gateway; past this it sends lists inline.
pub const MAX_LISTS: usize = 1 << 20;

/// A recipient list's number on its link.
pub type ListId = u64;

/// What crosses a cell→gateway link, as the gateway decodes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Incoming {
    /// Any message, as is (a `Deliver` with its list inline).
    Message(ToGateway),
    /// Remember `sessions` as list `list` (used by the `DeliverTo`s that follow).
    Recipients {
        list: ListId,
        sessions: Arc<[SessionId]>,
    },
    /// Deliver `frame` to the sessions of list `list`.
    DeliverTo { list: ListId, frame: Frame },
    /// List `list` will not be used again.
    Forget { list: ListId },
}

/// [`Incoming`] as the cell encodes it, borrowing what it sends: the same variants in the same
/// order, so the encodings are the same (tested below).
#[derive(Serialize)]
enum Outgoing<'a> {
    Message(&'a ToGateway),
    Recipients {
        list: ListId,
        sessions: &'a [SessionId],
    },
    DeliverTo {
        list: ListId,
        frame: &'a Frame,
    },
    Forget {
        list: ListId,
    },
}

/// A list the encoder numbered, known by the address of its allocation (which the `Weak`
/// keeps from being reused while the entry exists).
struct Numbered {
    list: ListId,
    held: Weak<[SessionId]>,
}

/// The cell's end: writes `ToGateway` messages, numbering the lists worth numbering.
pub struct ListEncoder {
    known: HashMap<usize, Numbered>,
    next: ListId,
    /// How many lists were alive at the last sweep.
    live_at_sweep: usize,
    /// Lists numbered or refused a number since the last sweep; the next sweep waits until
    /// there were as many as were alive then, so that sweeping costs O(1) per list.
    since_sweep: usize,
    max_lists: usize,
}

impl Default for ListEncoder {
    fn default() -> Self {
        ListEncoder::with_max_lists(MAX_LISTS)
    }
}

impl ListEncoder {
    /// An encoder that keeps at most `max_lists` numbered (tests use small bounds).
    pub fn with_max_lists(max_lists: usize) -> ListEncoder {
        ListEncoder {
            known: HashMap::new(),
            next: 0,
            live_at_sweep: 0,
            since_sweep: 0,
            max_lists,
        }
    }

    /// How many lists the gateway holds for this link.
    pub fn numbered(&self) -> usize {
        self.known.len()
    }

    /// Adds `message` to `writer`: a `Deliver` whose list is shared as its number (sending the
    /// list first if the gateway does not have it), anything else as is.
    pub fn push(
        &mut self,
        writer: &mut FrameWriter,
        message: &ToGateway,
    ) -> Result<(), MessageTooLarge> {
        if let ToGateway::Deliver { sessions, frame } = message {
            if let Some(list) = self.number(writer, sessions) {
                return writer.push(&Outgoing::DeliverTo { list, frame });
            }
        }
        writer.push(&Outgoing::Message(message))
    }

    /// The number of `sessions` on this link, sending the list first if it is new; `None` to
    /// send it inline (used once, or the link holds as many lists as it may).
    fn number(&mut self, writer: &mut FrameWriter, sessions: &Arc<[SessionId]>) -> Option<ListId> {
        // Held by the message alone: built for this one delivery.
        if Arc::strong_count(sessions) < 2 {
            return None;
        }
        let address = Arc::as_ptr(sessions) as *const SessionId as usize;
        if let Some(known) = self.known.get(&address) {
            if known.held.strong_count() > 0 {
                return Some(known.list);
            }
        }
        self.sweep(writer);
        self.since_sweep += 1;
        if self.known.len() >= self.max_lists {
            return None;
        }
        let list = self.next;
        let recipients = Outgoing::Recipients {
            list,
            sessions: sessions.as_ref(),
        };
        writer.push(&recipients).ok()?;
        self.next += 1;
        self.known.insert(
            address,
            Numbered {
                list,
                held: Arc::downgrade(sessions),
            },
        );
        Some(list)
    }

    /// Tells the gateway to forget every list nobody holds any more, once as many lists were
    /// numbered (or refused) since the last sweep as were alive then: the map never holds more
    /// than twice the live lists plus 64. (An entry is only ever removed here: a dropped list's
    /// address cannot be reused while the entry's `Weak` lives, so no live list is mistaken
    /// for a forgotten one.)
    fn sweep(&mut self, writer: &mut FrameWriter) {
        if self.since_sweep < self.live_at_sweep.max(64) {
            return;
        }
        self.known.retain(|_, known| {
            if known.held.strong_count() > 0 {
                return true;
            }
            // A message this small always fits.
            let _ = writer.push(&Outgoing::Forget { list: known.list });
            false
        });
        self.live_at_sweep = self.known.len();
        self.since_sweep = 0;
    }
}

/// Why a cell's messages made no sense.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ListError {
    #[error("the cell used recipient list {0}, which it never sent or already forgot")]
    Unknown(ListId),
    #[error("the cell sent recipient list {0} twice")]
    Duplicate(ListId),
    #[error("the cell sent more than {0} recipient lists")]
    TooMany(usize),
}

/// The gateway's end: keeps the lists a cell sent and turns what arrives back into
/// `ToGateway` messages.
pub struct ListDecoder {
    lists: HashMap<ListId, Arc<[SessionId]>>,
    max_lists: usize,
}

impl Default for ListDecoder {
    fn default() -> Self {
        ListDecoder {
            lists: HashMap::new(),
            max_lists: MAX_LISTS,
        }
    }
}

impl ListDecoder {
    /// The message `incoming` stands for, if any (a list sent or forgotten is none).
    pub fn resolve(&mut self, incoming: Incoming) -> Result<Option<ToGateway>, ListError> {
        match incoming {
            Incoming::Message(message) => Ok(Some(message)),
            Incoming::Recipients { list, sessions } => {
                if self.lists.len() >= self.max_lists {
                    return Err(ListError::TooMany(self.max_lists));
                }
                if self.lists.contains_key(&list) {
                    return Err(ListError::Duplicate(list));
                }
                self.lists.insert(list, sessions);
                Ok(None)
            }
            Incoming::DeliverTo { list, frame } => {
                let sessions = self.lists.get(&list).ok_or(ListError::Unknown(list))?;
                Ok(Some(ToGateway::Deliver {
                    sessions: Arc::clone(sessions),
                    frame,
                }))
            }
            Incoming::Forget { list } => {
                self.lists.remove(&list).ok_or(ListError::Unknown(list))?;
                Ok(None)
            }
        }
    }

    /// How many lists the link holds.
    pub fn held(&self) -> usize {
        self.lists.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::link::{decode_batch, Framing, Reassembler};
    use bytestring::ByteString;

    fn ids(names: &[&str]) -> Arc<[SessionId]> {
        names
            .iter()
            .map(|n| SessionId::new(n).unwrap_or_else(|e| panic!("{e}")))
            .collect()
    }

    /// What `deliver` sends, with a list of its own (so that holding it does not hold the
    /// list the encoder sees).
    fn expected(sessions: &Arc<[SessionId]>, n: u64) -> ToGateway {
        deliver(&Arc::from(sessions.to_vec()), n)
    }

    fn deliver(sessions: &Arc<[SessionId]>, n: u64) -> ToGateway {
        ToGateway::Deliver {
            sessions: Arc::clone(sessions),
            frame: Frame::new(ByteString::from(format!("{{\"n\":{n}}}")), n),
        }
    }

    /// Encodes `messages` (each dropped once written, as the link writer does) and returns
    /// what the gateway's decoder makes of the frames, and what crossed.
    fn cross(
        encoder: &mut ListEncoder,
        decoder: &mut ListDecoder,
        messages: Vec<ToGateway>,
    ) -> (Vec<ToGateway>, Vec<Incoming>) {
        let mut writer = FrameWriter::new(Framing::for_max_frame(1 << 20));
        for message in messages {
            encoder
                .push(&mut writer, &message)
                .unwrap_or_else(|e| panic!("{e}"));
        }
        let mut reassembler = Reassembler::default();
        let mut crossed = Vec::new();
        for frame in writer.take() {
            crossed.extend(
                reassembler
                    .push::<Incoming>(&frame)
                    .unwrap_or_else(|e| panic!("{e}")),
            );
        }
        let resolved = crossed
            .iter()
            .cloned()
            .filter_map(|m| decoder.resolve(m).unwrap_or_else(|e| panic!("{e}")))
            .collect();
        (resolved, crossed)
    }

    #[test]
    fn a_shared_list_crosses_once_and_every_delivery_comes_back_with_it() {
        let (mut encoder, mut decoder) = (ListEncoder::default(), ListDecoder::default());
        let cached = ids(&["a", "b", "c"]);
        let sent: Vec<ToGateway> = (0..5).map(|n| deliver(&cached, n)).collect();
        let (resolved, crossed) = cross(&mut encoder, &mut decoder, sent.clone());
        assert_eq!(resolved, sent);
        let lists = crossed
            .iter()
            .filter(|m| matches!(m, Incoming::Recipients { .. }))
            .count();
        let references = crossed
            .iter()
            .filter(|m| matches!(m, Incoming::DeliverTo { .. }))
            .count();
        assert_eq!((lists, references), (1, 5));
        // The gateway's copies share one list.
        let ToGateway::Deliver {
            sessions: first, ..
        } = &resolved[0]
        else {
            panic!("{:?}", resolved[0])
        };
        let ToGateway::Deliver { sessions: last, .. } = &resolved[4] else {
            panic!("{:?}", resolved[4])
        };
        assert!(Arc::ptr_eq(first, last));
    }

    #[test]
    fn a_list_built_for_one_delivery_travels_inline() {
        let (mut encoder, mut decoder) = (ListEncoder::default(), ListDecoder::default());
        // The message holds the only reference to its list.
        let once = ToGateway::Deliver {
            sessions: ids(&["a", "b"]),
            frame: Frame::new(ByteString::from_static("{}"), 1),
        };
        let (resolved, crossed) = cross(&mut encoder, &mut decoder, vec![once]);
        let message = ToGateway::Deliver {
            sessions: ids(&["a", "b"]),
            frame: Frame::new(ByteString::from_static("{}"), 1),
        };
        assert_eq!(resolved, vec![message.clone()]);
        assert_eq!(crossed, vec![Incoming::Message(message)]);
        assert_eq!(decoder.held(), 0);
    }

    #[test]
    fn dropped_lists_are_forgotten_on_both_ends_and_changed_lists_cross_again() {
        let (mut encoder, mut decoder) = (ListEncoder::default(), ListDecoder::default());
        // A channel whose subscriptions change 500 times: each version is a new list, used
        // twice while the cache holds it.
        for version in 0..500u64 {
            let cached = ids(&["a", &format!("s{version}")]);
            let sent = vec![
                deliver(&cached, 2 * version),
                deliver(&cached, 2 * version + 1),
            ];
            let (resolved, _) = cross(&mut encoder, &mut decoder, sent);
            let want = [2 * version, 2 * version + 1].map(|n| expected(&cached, n));
            assert_eq!(resolved, want);
            drop((cached, resolved));
        }
        // Swept as it goes: never more than twice the live lists (here none) plus the floor.
        assert!(encoder.numbered() <= 64, "{}", encoder.numbered());
        assert_eq!(decoder.held(), encoder.numbered());
    }

    #[test]
    fn past_its_bound_the_encoder_sends_lists_inline() {
        let mut encoder = ListEncoder::with_max_lists(2);
        let mut decoder = ListDecoder::default();
        let held: Vec<Arc<[SessionId]>> = (0..4).map(|n| ids(&[&format!("s{n}")])).collect();
        let sent: Vec<ToGateway> = held.iter().map(|l| deliver(l, 0)).collect();
        let (resolved, crossed) = cross(&mut encoder, &mut decoder, sent.clone());
        assert_eq!(resolved, sent);
        let inline = crossed
            .iter()
            .filter(|m| matches!(m, Incoming::Message(_)))
            .count();
        assert_eq!(inline, 2);
        assert_eq!(decoder.held(), 2);
    }

    #[test]
    fn the_borrowed_encoding_is_the_one_the_gateway_decodes() {
        let list = ids(&["a"]);
        let frame = Frame::new(ByteString::from_static("{}"), 3);
        let message = deliver(&list, 1);
        let pairs = [
            (
                crate::link::encode(&Outgoing::Message(&message)),
                Incoming::Message(message.clone()),
            ),
            (
                crate::link::encode(&Outgoing::Recipients {
                    list: 7,
                    sessions: &list,
                }),
                Incoming::Recipients {
                    list: 7,
                    sessions: list.clone(),
                },
            ),
            (
                crate::link::encode(&Outgoing::DeliverTo {
                    list: 7,
                    frame: &frame,
                }),
                Incoming::DeliverTo {
                    list: 7,
                    frame: frame.clone(),
                },
            ),
            (
                crate::link::encode(&Outgoing::Forget { list: 7 }),
                Incoming::Forget { list: 7 },
            ),
        ];
        for (bytes, incoming) in pairs {
            assert_eq!(bytes, crate::link::encode(&incoming));
            let back: Vec<Incoming> = decode_batch(&bytes).unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(back, vec![incoming]);
        }
    }

    #[test]
    fn a_gateway_refuses_unknown_duplicate_and_too_many_lists() {
        let frame = Frame::new(ByteString::from_static("{}"), 1);
        let mut decoder = ListDecoder {
            lists: HashMap::new(),
            max_lists: 1,
        };
        assert_eq!(
            decoder.resolve(Incoming::DeliverTo {
                list: 4,
                frame: frame.clone()
            }),
            Err(ListError::Unknown(4))
        );
        assert_eq!(
            decoder.resolve(Incoming::Forget { list: 4 }),
            Err(ListError::Unknown(4))
        );
        let recipients = |list| Incoming::Recipients {
            list,
            sessions: ids(&["a"]),
        };
        assert_eq!(decoder.resolve(recipients(1)), Ok(None));
        assert_eq!(decoder.resolve(recipients(2)), Err(ListError::TooMany(1)));
        decoder.max_lists = 2;
        assert_eq!(decoder.resolve(recipients(1)), Err(ListError::Duplicate(1)));
    }
}
