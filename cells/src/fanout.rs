//! Fanout: a channel's subscribed sessions grouped by gateway link, so that one event costs one
//! `Deliver` per gateway.
//!
//! Hot path: each group keeps its session list as a cached `Arc<[SessionId]>`, rebuilt only
//! after subscriptions change, and each event's frame is encoded once by the caller; delivering
//! an event to N sessions on G gateways is G reference-count bumps and G `try_send`s, with no
//! per-recipient allocation.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use confab_shared::link::{Frame, ToGateway};
use confab_shared::server::{encode_event, Event};
use confab_shared::{SessionId, UserId};

use crate::link::Link;
use crate::registry::SessionEntry;

/// Encodes an event once into the frame every recipient shares.
pub(crate) fn frame(event: &Event, created_us: u64) -> Frame {
    Frame::new(encode_event(event), created_us)
}

/// Delivers `frame` to `sessions` (of any links): one `Deliver` per link. For the few
/// per-user deliveries (`channel_added`, `read`), not the channel fanout.
pub(crate) fn deliver_to(sessions: &[Arc<SessionEntry>], frame: &Frame) {
    let mut by_link: Vec<(&Arc<Link>, Vec<SessionId>)> = Vec::new();
    for s in sessions {
        match by_link.iter_mut().find(|(l, _)| l.id == s.link.id) {
            Some((_, ids)) => ids.push(s.id.clone()),
            None => by_link.push((&s.link, vec![s.id.clone()])),
        }
    }
    for (link, ids) in by_link {
        link.push(ToGateway::Deliver {
            sessions: Arc::from(ids),
            frame: frame.clone(),
        });
    }
}

struct LinkGroup {
    link: Arc<Link>,
    sessions: HashSet<SessionId>,
    /// `None` after a change; rebuilt at the next delivery.
    cached: Option<Arc<[SessionId]>>,
}

impl LinkGroup {
    fn recipients(&mut self) -> Arc<[SessionId]> {
        self.cached
            .get_or_insert_with(|| self.sessions.iter().cloned().collect())
            .clone()
    }
}

/// The sessions a channel delivers to.
#[derive(Default)]
pub(crate) struct Subscribers {
    groups: HashMap<u64, LinkGroup>,
    /// Each subscribed session's user and link, to remove it by id.
    sessions: HashMap<SessionId, (UserId, u64)>,
    /// Each user's subscribed sessions, to exclude a typist or remove a leaver.
    by_user: HashMap<UserId, Vec<Arc<SessionEntry>>>,
}

impl Subscribers {
    pub(crate) fn is_empty(&self) -> bool {
        self.sessions.is_empty()
    }

    /// Subscribes a session; `false` when it already was.
    pub(crate) fn add(&mut self, entry: &Arc<SessionEntry>) -> bool {
        if self.sessions.contains_key(&entry.id) {
            return false;
        }
        self.sessions
            .insert(entry.id.clone(), (entry.user.clone(), entry.link.id));
        self.by_user
            .entry(entry.user.clone())
            .or_default()
            .push(entry.clone());
        let group = self
            .groups
            .entry(entry.link.id)
            .or_insert_with(|| LinkGroup {
                link: entry.link.clone(),
                sessions: HashSet::new(),
                cached: None,
            });
        group.sessions.insert(entry.id.clone());
        group.cached = None;
        true
    }

    /// Unsubscribes a session, if it was subscribed.
    pub(crate) fn remove(&mut self, session: &SessionId) {
        let Some((user, link)) = self.sessions.remove(session) else {
            return;
        };
        if let Some(list) = self.by_user.get_mut(&user) {
            list.retain(|e| &e.id != session);
            if list.is_empty() {
                self.by_user.remove(&user);
            }
        }
        if let Some(group) = self.groups.get_mut(&link) {
            group.sessions.remove(session);
            group.cached = None;
            if group.sessions.is_empty() {
                self.groups.remove(&link);
            }
        }
    }

    /// Unsubscribes every session of a user and returns them.
    pub(crate) fn remove_user(&mut self, user: &UserId) -> Vec<Arc<SessionEntry>> {
        let entries = self.by_user.get(user).cloned().unwrap_or_default();
        for entry in &entries {
            self.remove(&entry.id);
        }
        entries
    }

    /// Delivers one frame to every subscribed session: one `Deliver` per link.
    pub(crate) fn deliver(&mut self, frame: &Frame) {
        let mut lost = Vec::new();
        for (id, group) in self.groups.iter_mut() {
            let sessions = group.recipients();
            if !group.link.push(ToGateway::Deliver {
                sessions,
                frame: frame.clone(),
            }) {
                lost.push(*id);
            }
        }
        self.drop_links(lost);
    }

    /// Delivers to every subscribed session except those of `user` (typing). Only groups that
    /// hold one of the user's sessions pay for a filtered list.
    pub(crate) fn deliver_except(&mut self, user: &UserId, frame: &Frame) {
        let excluded: HashSet<&SessionId> = self
            .by_user
            .get(user)
            .map(|list| list.iter().map(|e| &e.id).collect())
            .unwrap_or_default();
        let mut lost = Vec::new();
        for (id, group) in self.groups.iter_mut() {
            let sessions = if group.sessions.iter().any(|s| excluded.contains(s)) {
                let kept: Vec<SessionId> = group
                    .sessions
                    .iter()
                    .filter(|s| !excluded.contains(s))
                    .cloned()
                    .collect();
                if kept.is_empty() {
                    continue;
                }
                Arc::from(kept)
            } else {
                group.recipients()
            };
            if !group.link.push(ToGateway::Deliver {
                sessions,
                frame: frame.clone(),
            }) {
                lost.push(*id);
            }
        }
        self.drop_links(lost);
    }

    /// Forgets the groups of links the cell gave up on; the registry detaches their sessions
    /// everywhere else.
    fn drop_links(&mut self, lost: Vec<u64>) {
        for id in lost {
            if let Some(group) = self.groups.remove(&id) {
                for session in group.sessions {
                    if let Some((user, _)) = self.sessions.remove(&session) {
                        if let Some(list) = self.by_user.get_mut(&user) {
                            list.retain(|e| e.id != session);
                            if list.is_empty() {
                                self.by_user.remove(&user);
                            }
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use confab_shared::WorkspaceId;
    use tokio::sync::mpsc;

    struct Gateway {
        link: Arc<Link>,
        rx: mpsc::Receiver<ToGateway>,
    }

    fn gateway(id: u64) -> Gateway {
        let (tx, rx) = mpsc::channel(16);
        Gateway {
            link: Arc::new(Link::new(id, format!("g{id}"), tx)),
            rx,
        }
    }

    fn session(name: &str, user: &str, gw: &Gateway) -> Arc<SessionEntry> {
        Arc::new(SessionEntry::new(
            SessionId::new(name).unwrap(),
            WorkspaceId::new("w").unwrap(),
            UserId::new(user).unwrap(),
            gw.link.clone(),
        ))
    }

    fn recipients(gw: &mut Gateway) -> Vec<Arc<[SessionId]>> {
        let mut out = Vec::new();
        while let Ok(message) = gw.rx.try_recv() {
            if let ToGateway::Deliver { sessions, .. } = message {
                out.push(sessions);
            }
        }
        out
    }

    fn names(list: &Arc<[SessionId]>) -> Vec<&str> {
        let mut names: Vec<&str> = list.iter().map(SessionId::as_str).collect();
        names.sort_unstable();
        names
    }

    fn typing_frame() -> Frame {
        let event = Event::Typing {
            channel: confab_shared::ChannelId::new("c").unwrap(),
            user: UserId::new("alice").unwrap(),
        };
        frame(&event, 1)
    }

    #[test]
    fn one_deliver_per_link_with_a_cached_list_rebuilt_only_on_change() {
        let (mut g1, mut g2) = (gateway(1), gateway(2));
        let mut subs = Subscribers::default();
        assert!(subs.add(&session("a1", "alice", &g1)));
        assert!(subs.add(&session("b1", "bob", &g1)));
        assert!(subs.add(&session("b2", "bob", &g2)));
        assert!(
            !subs.add(&session("b2", "bob", &g2)),
            "subscribing twice is a no-op"
        );
        let frame = typing_frame();
        subs.deliver(&frame);
        subs.deliver(&frame);
        let (first, second) = (recipients(&mut g1), recipients(&mut g2));
        assert_eq!(first.len(), 2);
        assert_eq!(names(&first[0]), ["a1", "b1"]);
        assert!(
            Arc::ptr_eq(&first[0], &first[1]),
            "no rebuild between events"
        );
        assert_eq!(names(&second[0]), ["b2"]);

        subs.remove(&SessionId::new("a1").unwrap());
        subs.deliver(&frame);
        let after = recipients(&mut g1);
        assert_eq!(names(&after[0]), ["b1"]);
    }

    #[test]
    fn deliver_except_skips_every_session_of_the_user_and_empty_links() {
        let (mut g1, mut g2) = (gateway(1), gateway(2));
        let mut subs = Subscribers::default();
        subs.add(&session("a1", "alice", &g1));
        subs.add(&session("b1", "bob", &g1));
        subs.add(&session("a2", "alice", &g2));
        subs.deliver_except(&UserId::new("alice").unwrap(), &typing_frame());
        assert_eq!(names(&recipients(&mut g1)[0]), ["b1"]);
        assert!(
            recipients(&mut g2).is_empty(),
            "no Deliver with no recipient"
        );
    }

    #[test]
    fn remove_user_returns_and_unsubscribes_all_of_its_sessions() {
        let g1 = gateway(1);
        let mut subs = Subscribers::default();
        subs.add(&session("a1", "alice", &g1));
        subs.add(&session("a2", "alice", &g1));
        subs.add(&session("b1", "bob", &g1));
        let removed = subs.remove_user(&UserId::new("alice").unwrap());
        assert_eq!(removed.len(), 2);
        assert_eq!(subs.sessions.len(), 1);
    }
}
