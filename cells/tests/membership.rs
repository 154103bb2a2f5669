//! Joining, leaving, inviting, private channels, DMs, listings and workspace isolation.

#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use confab_shared::link::{AdminOp, CellError, CellOp, CellReply, ChannelOp, UserOp, WorkspaceOp};
use confab_shared::server::{ChannelInfo, ChannelKind};
use confab_shared::ErrorCode;

fn add(channel: &str, who: &str) -> CellOp {
    CellOp::channel(ch(channel), ChannelOp::AddMember { user: user(who) })
}
fn remove(channel: &str, who: &str) -> CellOp {
    CellOp::channel(ch(channel), ChannelOp::RemoveMember { user: user(who) })
}
fn create(name: &str, kind: ChannelKind, members: &[&str]) -> CellOp {
    CellOp::Workspace(WorkspaceOp::CreateChannel {
        name: name.into(),
        kind,
        members: members.iter().map(|m| user(m)).collect(),
    })
}
fn channel_of(reply: Result<CellReply, CellError>) -> ChannelInfo {
    match reply {
        Ok(CellReply::Channel(info)) => info,
        other => panic!("expected a channel, got {other:?}"),
    }
}

on_every_engine!(
    joining_a_public_channel_subscribes_and_leaving_reaches_the_leaver_last,
    create_channel_logs_the_creator_first_and_refuses_bad_names_and_duplicates,
    open_dm_creates_once_and_returns_the_same_channel_to_both_users,
    list_channels_gives_mine_with_markers_or_every_public_one,
    another_workspace_never_sees_or_touches_this_one,
);

#[actix_rt::test]
async fn join_and_leave_that_change_nothing_ack_the_current_last_seq_without_an_event() {
    let (_cell, mut gw) = start().await;
    gw.attach("bob", "b1").await;
    gw.settle().await;
    let join = gw.op("alice", None, add("general", "alice")).await;
    assert_eq!(ack_seq(&join), 2);
    let leave = gw.op("carol", None, remove("general", "carol")).await;
    assert_eq!(ack_seq(&leave), 2);
    assert!(gw.drain("b1").await.is_empty());
}

async fn joining_a_public_channel_subscribes_and_leaving_reaches_the_leaver_last(engine: Engine) {
    let (_cell, mut gw, _store) = start_on(engine, 10_000).await;
    gw.attach("carol", "c1").await;
    gw.attach("bob", "b1").await;
    let joined = gw.op("carol", Some("c1"), add("general", "carol")).await;
    assert_eq!(ack_seq(&joined), 3);
    let c = gw.event("c1").await;
    assert_eq!(
        (c["type"].as_str(), c["seq"].as_u64(), c["user"].as_str()),
        (Some("member_joined"), Some(3), Some("carol"))
    );
    assert_eq!(gw.event("b1").await["seq"], 3);
    gw.op("bob", None, send_op("general", "hi carol"))
        .await
        .unwrap();
    assert_eq!(gw.event("c1").await["type"], "message");
    let left = gw.op("carol", Some("c1"), remove("general", "carol")).await;
    assert_eq!(ack_seq(&left), 5);
    let c = gw.event("c1").await;
    assert_eq!(
        (c["type"].as_str(), c["seq"].as_u64()),
        (Some("member_left"), Some(5))
    );
    gw.op("bob", None, send_op("general", "gone"))
        .await
        .unwrap();
    let rest = gw.drain("c1").await;
    assert!(rest.is_empty(), "no events after leaving: {rest:?}");
    assert_eq!(gw.drain("b1").await.len(), 3);
}

#[actix_rt::test]
async fn a_private_channel_is_not_found_for_non_members_on_every_op() {
    let (_cell, mut gw) = start().await;
    let info = channel_of(
        gw.op(
            "alice",
            None,
            create("secret", ChannelKind::Private, &["bob"]),
        )
        .await,
    );
    let id = info.id.as_str().to_string();
    let ops = [
        send_op(&id, "x"),
        CellOp::channel(ch(&id), ChannelOp::Typing),
        CellOp::channel(
            ch(&id),
            ChannelOp::History {
                before: None,
                after: None,
                limit: 10,
            },
        ),
        add(&id, "carol"),
        add(&id, "alice"),
        remove(&id, "carol"),
        remove(&id, "bob"),
        CellOp::channel(ch(&id), ChannelOp::ListMembers),
        CellOp::User(UserOp::Read {
            channel: ch(&id),
            seq: 1,
        }),
        CellOp::channel(
            ch(&id),
            ChannelOp::Edit {
                seq: 1,
                text: "x".into(),
            },
        ),
        CellOp::channel(ch(&id), ChannelOp::Delete { seq: 1 }),
    ];
    for op in ops {
        let reply = gw.op("carol", None, op.clone()).await;
        assert_eq!(code(&reply), ErrorCode::NotFound, "{op:?}");
    }
    let public = gw
        .op(
            "carol",
            None,
            CellOp::User(UserOp::ListChannels { public: true }),
        )
        .await;
    let Ok(CellReply::Channels(list)) = public else {
        panic!("{public:?}")
    };
    assert!(list.iter().all(|c| c.id.as_str() != id));
    let members = gw
        .op(
            "bob",
            None,
            CellOp::channel(ch(&id), ChannelOp::ListMembers),
        )
        .await;
    assert_eq!(
        members,
        Ok(CellReply::Members(vec![user("alice"), user("bob")]))
    );
}

#[actix_rt::test]
async fn an_invited_user_gets_channel_added_before_member_joined_on_all_its_sessions() {
    let (cell, mut gw) = start().await;
    let mut gw2 = Gw::connect(&cell, "g2", 100);
    gw.attach("carol", "c1").await;
    gw2.attach("carol", "c2").await;
    gw.attach("bob", "b1").await;
    let reply = gw.op("bob", Some("b1"), add("general", "carol")).await;
    assert_eq!(ack_seq(&reply), 3);
    for (g, s) in [(&mut gw, "c1"), (&mut gw2, "c2")] {
        let added = g.event(s).await;
        assert_eq!(added["type"], "channel_added");
        assert_eq!(added["channel"], "general");
        assert_eq!(added["info"]["id"], "general");
        assert_eq!(added["info"]["kind"], "public");
        assert_eq!(added["info"]["read_seq"], 0);
        let joined = g.event(s).await;
        assert_eq!(
            (joined["type"].as_str(), joined["user"].as_str()),
            (Some("member_joined"), Some("carol"))
        );
    }
    // Bob added carol himself: his session gets the join but no channel_added.
    let bob = gw.drain("b1").await;
    assert_eq!(bob.len(), 1);
    assert_eq!(bob[0]["type"], "member_joined");
}

#[actix_rt::test]
async fn adding_others_needs_membership_and_dms_never_change() {
    let (_cell, mut gw) = start().await;
    assert_eq!(
        code(&gw.op("carol", None, add("general", "dave")).await),
        ErrorCode::Forbidden
    );
    assert_eq!(
        code(&gw.op("carol", None, remove("general", "bob")).await),
        ErrorCode::Forbidden
    );
    let dm = channel_of(
        gw.op(
            "alice",
            None,
            CellOp::Workspace(WorkspaceOp::OpenDm { user: user("bob") }),
        )
        .await,
    );
    let id = dm.id.as_str().to_string();
    assert_eq!(
        code(&gw.op("alice", None, add(&id, "carol")).await),
        ErrorCode::Forbidden
    );
    assert_eq!(
        code(&gw.op("alice", None, remove(&id, "alice")).await),
        ErrorCode::Forbidden
    );
    assert_eq!(
        code(&gw.op("carol", None, add(&id, "carol")).await),
        ErrorCode::NotFound
    );
}

async fn create_channel_logs_the_creator_first_and_refuses_bad_names_and_duplicates(
    engine: Engine,
) {
    let (_cell, mut gw, _store) = start_on(engine, 10_000).await;
    gw.attach("bob", "b1").await;
    let info = channel_of(
        gw.op(
            "alice",
            None,
            create("dev", ChannelKind::Public, &["bob", "alice", "bob"]),
        )
        .await,
    );
    assert_eq!(
        (info.name.as_str(), info.kind, info.last_seq, info.read_seq),
        ("dev", ChannelKind::Public, 2, 0)
    );
    assert!(info.id.as_str().starts_with('C') && info.id.as_str().len() == 11);
    let bob = gw.drain("b1").await;
    let kinds: Vec<&str> = bob.iter().map(|v| v["type"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["channel_added", "member_joined"]);
    assert_eq!(bob[1]["user"], "bob");
    assert_eq!(bob[1]["seq"], 2);
    let members = gw
        .op(
            "alice",
            None,
            CellOp::channel(info.id.clone(), ChannelOp::ListMembers),
        )
        .await;
    assert_eq!(
        members,
        Ok(CellReply::Members(vec![user("alice"), user("bob")]))
    );

    let dup = gw
        .op("bob", None, create("dev", ChannelKind::Public, &[]))
        .await;
    assert_eq!(code(&dup), ErrorCode::Conflict);
    // A private channel's name collides with nothing (SPEC §3).
    let private = gw
        .op("bob", None, create("dev", ChannelKind::Private, &[]))
        .await;
    assert!(private.is_ok(), "{private:?}");
    for bad in ["", "   ", &"x".repeat(81)] {
        assert_eq!(
            code(
                &gw.op("bob", None, create(bad, ChannelKind::Public, &[]))
                    .await
            ),
            ErrorCode::BadRequest
        );
    }
    assert_eq!(
        code(&gw.op("bob", None, create("d", ChannelKind::Dm, &[])).await),
        ErrorCode::BadRequest
    );
    let many: Vec<String> = (0..1001).map(|i| format!("u{i}")).collect();
    let many: Vec<&str> = many.iter().map(String::as_str).collect();
    assert_eq!(
        code(
            &gw.op("bob", None, create("big", ChannelKind::Public, &many))
                .await
        ),
        ErrorCode::BadRequest
    );
}

async fn open_dm_creates_once_and_returns_the_same_channel_to_both_users(engine: Engine) {
    let (_cell, mut gw, _store) = start_on(engine, 10_000).await;
    gw.attach("bob", "b1").await;
    let first = channel_of(
        gw.op(
            "alice",
            None,
            CellOp::Workspace(WorkspaceOp::OpenDm { user: user("bob") }),
        )
        .await,
    );
    assert_eq!(
        (first.kind, first.name.as_str(), first.last_seq),
        (ChannelKind::Dm, "alice,bob", 2)
    );
    let again = channel_of(
        gw.op(
            "bob",
            None,
            CellOp::Workspace(WorkspaceOp::OpenDm {
                user: user("alice"),
            }),
        )
        .await,
    );
    assert_eq!(again.id, first.id);
    let bob = gw.drain("b1").await;
    let kinds: Vec<&str> = bob.iter().map(|v| v["type"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["channel_added", "member_joined"]);
    assert_eq!(
        code(&gw.op("carol", None, send_op(first.id.as_str(), "x")).await),
        ErrorCode::NotFound
    );
}

async fn list_channels_gives_mine_with_markers_or_every_public_one(engine: Engine) {
    let (_cell, mut gw, _store) = start_on(engine, 10_000).await;
    channel_of(
        gw.op("alice", None, create("zzz", ChannelKind::Private, &[]))
            .await,
    );
    gw.op(
        "alice",
        None,
        CellOp::User(UserOp::Read {
            channel: ch("general"),
            seq: 1,
        }),
    )
    .await
    .unwrap();
    let Ok(CellReply::Channels(mine)) = gw
        .op(
            "alice",
            None,
            CellOp::User(UserOp::ListChannels { public: false }),
        )
        .await
    else {
        panic!()
    };
    assert_eq!(mine.len(), 2);
    let general = mine.iter().find(|c| c.id.as_str() == "general").unwrap();
    assert_eq!((general.last_seq, general.read_seq), (2, 1));
    let Ok(CellReply::Channels(public)) = gw
        .op(
            "carol",
            None,
            CellOp::User(UserOp::ListChannels { public: true }),
        )
        .await
    else {
        panic!()
    };
    assert_eq!(public.len(), 1);
    assert_eq!((public[0].id.as_str(), public[0].read_seq), ("general", 0));
    let Ok(CellReply::Channels(none)) = gw
        .op(
            "carol",
            None,
            CellOp::User(UserOp::ListChannels { public: false }),
        )
        .await
    else {
        panic!()
    };
    assert!(none.is_empty());
}

async fn another_workspace_never_sees_or_touches_this_one(engine: Engine) {
    let (_cell, mut gw, _store) = start_on(engine, 10_000).await;
    gw.admin(AdminOp::CreateWorkspace {
        workspace: ws("other"),
        name: None,
    })
    .await
    .unwrap();
    gw.attach("bob", "b1").await;
    // alice of "other" is a different user: general of "w" does not exist for her.
    assert_eq!(
        code(
            &gw.op_in("other", "alice", None, send_op("general", "x"))
                .await
        ),
        ErrorCode::NotFound
    );
    assert_eq!(
        code(
            &gw.op_in(
                "other",
                "alice",
                None,
                CellOp::channel(
                    ch("general"),
                    ChannelOp::History {
                        before: None,
                        after: None,
                        limit: 5
                    }
                )
            )
            .await
        ),
        ErrorCode::NotFound
    );
    assert_eq!(
        code(
            &gw.op_in("other", "alice", None, add("general", "alice"))
                .await
        ),
        ErrorCode::NotFound
    );
    let Ok(CellReply::Channels(list)) = gw
        .op_in(
            "other",
            "alice",
            None,
            CellOp::User(UserOp::ListChannels { public: true }),
        )
        .await
    else {
        panic!()
    };
    assert!(list.is_empty());
    gw.send_attach("other", "alice", "oa", &[("general", 0)], 100);
    assert_eq!(gw.attach_result("oa").await, Ok(vec![]));
    assert!(gw.drain("oa").await.is_empty());
    // The same channel id in the other workspace is another channel.
    let seed = gw
        .admin(AdminOp::SeedChannel {
            workspace: ws("other"),
            channel: ch("general"),
            kind: ChannelKind::Public,
            members: vec![user("alice")],
        })
        .await;
    assert_eq!(seed, Ok(CellReply::Done));
    assert_eq!(
        ack_seq(
            &gw.op_in("other", "alice", None, send_op("general", "x"))
                .await
        ),
        2
    );
    assert!(
        gw.drain("b1").await.is_empty(),
        "nothing crosses workspaces"
    );
    assert_eq!(
        ack_seq(&gw.op("alice", None, send_op("general", "y")).await),
        3
    );
}

#[actix_rt::test]
async fn seeding_an_existing_channel_changes_nothing() {
    let (_cell, mut gw) = start().await;
    gw.seed("general", ChannelKind::Public, &["carol"]).await;
    let members = gw
        .op(
            "alice",
            None,
            CellOp::channel(ch("general"), ChannelOp::ListMembers),
        )
        .await;
    assert_eq!(
        members,
        Ok(CellReply::Members(vec![user("alice"), user("bob")]))
    );
    let unknown = gw
        .admin(AdminOp::SeedChannel {
            workspace: ws("nope"),
            channel: ch("x"),
            kind: ChannelKind::Public,
            members: vec![],
        })
        .await;
    assert_eq!(code(&unknown), ErrorCode::NotFound);
}

#[actix_rt::test]
async fn a_channel_probed_before_it_existed_works_once_seeded() {
    let (_cell, mut gw) = start().await;
    assert_eq!(
        code(&gw.op("alice", None, send_op("later", "x")).await),
        ErrorCode::NotFound
    );
    gw.seed("later", ChannelKind::Private, &["alice"]).await;
    assert_eq!(
        ack_seq(&gw.op("alice", None, send_op("later", "x")).await),
        2
    );
}
