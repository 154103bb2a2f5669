//! The short, stable run of every fuzz target (CI): each check over the committed seed corpus
//! (`fuzz/corpus/<target>/`), the kept crashing inputs (`fuzz/regressions/<target>/`), and a few
//! thousand inputs from a seeded PRNG — random bytes and mutations of the seeds — so it is the
//! same on every run. The long coverage-guided runs are `cargo fuzz run` (docs/fuzzing.md).
//!
//! `CONFAB_FUZZ_WRITE_SEEDS=1 cargo test -p confab-fuzz-checks --test corpus` rewrites the
//! generated seed files from the typed values below.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use actix_codec::Encoder;
use actix_http::ws::{Codec, Item, Message};
use bytes::{Bytes, BytesMut};
use bytestring::ByteString;
use confab_fuzz_checks as checks;
use confab_shared::link::{
    self, Attach, Caller, CellError, CellOp, CellReply, ChannelOp, Frame, LinkAuth, LinkChallenge,
    LinkHello, ToCell, ToGateway, WorkspaceOp,
};
use confab_shared::recipient_lists::Incoming as FromCell;
use confab_shared::server::{ChannelInfo, ChannelKind};
use confab_shared::{ChannelId, CloseCode, ErrorCode, SessionId, UserId, WorkspaceId};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Inputs per target beyond the files.
const RANDOM_INPUTS: usize = 3000;

type Check = fn(&[u8]);

const TARGETS: [(&str, Check); 4] = [
    ("client_frame", checks::client_frame),
    ("link_decode", checks::link_decode),
    ("ws_frames", checks::ws_frames),
    ("jwt_verify", checks::jwt_verify),
];

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn files(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut files: Vec<(PathBuf, Vec<u8>)> = entries
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.is_file())
        .filter_map(|p| std::fs::read(&p).ok().map(|b| (p, b)))
        .collect();
    files.sort();
    files
}

fn mutate(rng: &mut StdRng, seed: &[u8]) -> Vec<u8> {
    let mut input = seed.to_vec();
    for _ in 0..rng.gen_range(1..=4) {
        match rng.gen_range(0..5) {
            0 if !input.is_empty() => {
                let at = rng.gen_range(0..input.len());
                input[at] ^= 1 << rng.gen_range(0..8);
            }
            1 if !input.is_empty() => {
                let at = rng.gen_range(0..input.len());
                input[at] = rng.gen();
            }
            2 => {
                let at = rng.gen_range(0..=input.len());
                input.insert(at, rng.gen());
            }
            3 if !input.is_empty() => {
                let at = rng.gen_range(0..input.len());
                input.truncate(at.max(1));
            }
            _ => {
                let at = rng.gen_range(0..=input.len());
                let len = rng.gen_range(0..8);
                let extra: Vec<u8> = (0..len).map(|_| rng.gen()).collect();
                input.splice(at..at, extra);
            }
        }
    }
    input
}

fn run_target(name: &str, check: Check) -> usize {
    let seeds = files(&fuzz_dir().join("corpus").join(name));
    let regressions = files(&fuzz_dir().join("regressions").join(name));
    assert!(!seeds.is_empty(), "no seed corpus for {name}");
    for (path, input) in seeds.iter().chain(&regressions) {
        eprintln!("{name}: {}", path.display());
        check(input);
    }
    let mut rng = StdRng::seed_from_u64(0x00c0_ffab);
    for i in 0..RANDOM_INPUTS {
        let input = if i % 3 == 0 {
            let len = rng.gen_range(0..256);
            (0..len).map(|_| rng.gen()).collect()
        } else {
            let (_, seed) = &seeds[rng.gen_range(0..seeds.len())];
            mutate(&mut rng, seed)
        };
        check(&input);
    }
    seeds.len() + regressions.len() + RANDOM_INPUTS
}

#[test]
fn client_frame_parser_survives_its_corpus_and_random_inputs() {
    assert!(run_target(TARGETS[0].0, TARGETS[0].1) > RANDOM_INPUTS);
}

#[test]
fn link_decoder_survives_its_corpus_and_random_inputs() {
    assert!(run_target(TARGETS[1].0, TARGETS[1].1) > RANDOM_INPUTS);
}

#[test]
fn websocket_frame_reader_survives_its_corpus_and_random_inputs() {
    assert!(run_target(TARGETS[2].0, TARGETS[2].1) > RANDOM_INPUTS);
}

#[test]
fn jwt_verification_survives_its_corpus_and_random_inputs() {
    assert!(run_target(TARGETS[3].0, TARGETS[3].1) > RANDOM_INPUTS);
}

fn id<T: std::str::FromStr>(s: &str) -> T
where
    T::Err: std::fmt::Debug,
{
    s.parse().unwrap_or_else(|e| panic!("{e:?}"))
}

/// The seeds of `link_decode`: one of each message kind, and a batch.
fn link_seeds() -> Vec<(&'static str, Vec<u8>)> {
    let session: SessionId = id("s1");
    let channel: ChannelId = id("general");
    let caller = Caller {
        workspace: id::<WorkspaceId>("demo"),
        user: id::<UserId>("alice"),
        session: Some(session.clone()),
    };
    let attach = ToCell::Attach(Attach {
        session: session.clone(),
        workspace: id("demo"),
        user: id("alice"),
        resume: vec![(channel.clone(), 4)],
        replay_limit: 4096,
    });
    let send = ToCell::Request {
        req: 7,
        caller: caller.clone(),
        op: CellOp::Channel {
            channel: channel.clone(),
            op: ChannelOp::Send {
                text: "hi".into(),
                client_msg_id: Some("m1".into()),
                thread: None,
            },
        },
    };
    let create = ToCell::Request {
        req: 8,
        caller,
        op: CellOp::Workspace(WorkspaceOp::CreateChannel {
            name: "x".into(),
            kind: ChannelKind::Private,
            members: vec![id("bob")],
        }),
    };
    let ready = ToGateway::Ready {
        session: session.clone(),
        channels: vec![ChannelInfo {
            id: channel.clone(),
            name: "general".into(),
            kind: ChannelKind::Public,
            last_seq: 4,
            read_seq: 2,
        }],
    };
    let deliver = ToGateway::Deliver {
        sessions: Arc::from(vec![session.clone(), id::<SessionId>("s2")]),
        frame: Frame::new(ByteString::from_static("{\"op\":\"event\"}"), 9),
    };
    let ack = ToGateway::Reply {
        req: 7,
        result: Ok(CellReply::Ack {
            channel,
            seq: 5,
            ts: 6,
        }),
    };
    let refused = ToGateway::Reply {
        req: 8,
        result: Err(CellError::new(ErrorCode::Unavailable, "down")),
    };
    let close = ToGateway::Close {
        session,
        code: CloseCode::ReconnectNow,
    };
    let mut batch = Vec::new();
    for message in [&ready, &deliver, &ack] {
        link::encode_into(message, &mut batch);
    }
    // What a cell writes: its messages wrapped, a recipient list sent once, used, forgotten.
    let mut from_cell = Vec::new();
    let list = Arc::from(vec![id::<SessionId>("s1"), id::<SessionId>("s2")]);
    for message in [
        FromCell::Message(ready.clone()),
        FromCell::Recipients {
            list: 1,
            sessions: list,
        },
        FromCell::DeliverTo {
            list: 1,
            frame: Frame::new(ByteString::from_static("{\"op\":\"event\"}"), 9),
        },
        FromCell::Forget { list: 1 },
        FromCell::Message(ack.clone()),
    ] {
        link::encode_into(&message, &mut from_cell);
    }
    vec![
        ("attach", link::encode(&attach)),
        ("send", link::encode(&send)),
        ("create_channel", link::encode(&create)),
        ("ready", link::encode(&ready)),
        ("deliver", link::encode(&deliver)),
        ("ack", link::encode(&ack)),
        ("refused", link::encode(&refused)),
        ("close", link::encode(&close)),
        ("batch", batch),
        ("from_cell", from_cell),
        (
            "hello",
            link::encode(&LinkHello {
                gateway: "g1".into(),
                nonce: [7; 32],
                protocol: link::LINK_PROTOCOL,
            }),
        ),
        (
            "challenge",
            link::encode(&LinkChallenge {
                cell: "c1".parse().unwrap_or_else(|e| panic!("{e}")),
                nonce: [9; 32],
                proof: Some([3; 32]),
                protocol: link::LINK_PROTOCOL,
            }),
        ),
        ("auth", link::encode(&LinkAuth { proof: None })),
    ]
}

/// The seeds of `ws_frames`: conforming client byte streams (odd first byte) and scripts.
fn ws_seeds() -> Vec<(&'static str, Vec<u8>)> {
    let mut client = Codec::new().client_mode();
    let mut stream = |messages: Vec<Message>| {
        let mut wire = BytesMut::new();
        for message in messages {
            client
                .encode(message, &mut wire)
                .unwrap_or_else(|e| panic!("{e:?}"));
        }
        wire.to_vec()
    };
    let hello = r#"{"op":"hello","token":"t"}"#;
    let raw = [
        (
            "text_and_ping",
            stream(vec![
                Message::Text(ByteString::from_static(hello)),
                Message::Ping(Bytes::from_static(b"p")),
            ]),
        ),
        (
            "fragmented",
            stream(vec![
                Message::Continuation(Item::FirstText(Bytes::from_static(b"{\"op\":"))),
                Message::Ping(Bytes::new()),
                Message::Continuation(Item::Continue(Bytes::from_static(b"\"pi"))),
                Message::Continuation(Item::Last(Bytes::from_static(b"ng\"}"))),
            ]),
        ),
        (
            "binary_and_close",
            stream(vec![
                Message::Binary(Bytes::from_static(b"\x00\x01")),
                Message::Close(None),
            ]),
        ),
        (
            "large_text",
            stream(vec![Message::Text(ByteString::from("x".repeat(700)))]),
        ),
    ];
    let mut seeds: Vec<(&'static str, Vec<u8>)> = raw
        .into_iter()
        .enumerate()
        .map(|(i, (name, bytes))| {
            let mut input = vec![(i as u8) << 1 | 1];
            input.extend(bytes);
            (name, input)
        })
        .collect();
    seeds.push(("script", vec![0, 0, 10, 1, 3, 2, 5, 4 | 8, 40, 3, 0]));
    seeds.push(("script_long", vec![0, 0xc0, 200, 0x1c, 255, 2, 125]));
    seeds
}

/// The seeds of `jwt_verify`: minted tokens to mutate (even first byte), a valid token good
/// until 2100 and two refused ones to verify (odd first byte).
fn jwt_seeds() -> Vec<(&'static str, Vec<u8>)> {
    let keys = confab_gateway::auth::TokenKeys::new(checks::JWT_SECRET);
    let long_lived = keys
        .mint(
            &id("demo"),
            &id("alice"),
            false,
            4_102_444_800 - 1_800_000_000,
        )
        .unwrap_or_else(|e| panic!("{e}"));
    let other_secret = confab_gateway::auth::TokenKeys::new("other")
        .mint(&id("demo"), &id("alice"), false, 3600)
        .unwrap_or_else(|e| panic!("{e}"));
    let verify = |token: &str| [b"\x01".as_slice(), token.as_bytes()].concat();
    vec![
        ("mint_and_change_header", b"\x00alicedemo-wsp-1\x10Z".to_vec()),
        ("mint_and_change_signature", b"\x02bot-user12345678\xf8A".to_vec()),
        ("valid_until_2100", verify(&long_lived)),
        ("other_secret", verify(&other_secret)),
        (
            "alg_none",
            verify("eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.eyJzdWIiOiJhIiwid3NwIjoiYiIsImV4cCI6OTk5OTk5OTk5OX0."),
        ),
    ]
}

fn client_frame_seeds() -> Vec<(&'static str, Vec<u8>)> {
    [
        ("hello", r#"{"op":"hello","token":"t","resume":{"general":4,"random":0}}"#),
        ("send", r#"{"op":"send","id":7,"channel":"general","text":"hi","client_msg_id":"m1","thread":3}"#),
        ("edit", r#"{"op":"edit","id":"e","channel":"general","seq":3,"text":"fixed"}"#),
        ("delete", r#"{"op":"delete","channel":"general","seq":3}"#),
        ("history", r#"{"op":"history","id":1,"channel":"general","before":10,"after":2,"limit":20}"#),
        ("presence_sub", r#"{"op":"presence_sub","users":["alice","bob"]}"#),
        ("join_leave_read", r#"{"op":"read","channel":"general","seq":5}"#),
        ("typing", r#"{"op":"typing","channel":"general"}"#),
        ("ping", r#"{"op":"ping","id":"p"}"#),
        ("unknown_op", r#"{"op":"dance","id":-1}"#),
    ]
    .into_iter()
    .map(|(name, text)| (name, text.as_bytes().to_vec()))
    .collect()
}

#[test]
fn the_seed_corpus_is_the_generated_one() {
    let generated = [
        ("client_frame", client_frame_seeds()),
        ("link_decode", link_seeds()),
        ("ws_frames", ws_seeds()),
        ("jwt_verify", jwt_seeds()),
    ];
    let write = std::env::var_os("CONFAB_FUZZ_WRITE_SEEDS").is_some();
    for (target, seeds) in generated {
        let dir = fuzz_dir().join("corpus").join(target);
        for (name, bytes) in seeds {
            let path = dir.join(name);
            if write {
                std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{e}"));
                std::fs::write(&path, &bytes).unwrap_or_else(|e| panic!("{e}"));
            }
            // Minted tokens carry their expiry and client frames a random mask, so those seeds
            // are only checked to exist.
            let on_disk = std::fs::read(&path)
                .unwrap_or_else(|e| panic!("{}: {e}; regenerate the seeds", path.display()));
            if matches!(target, "client_frame" | "link_decode") {
                assert_eq!(on_disk, bytes, "{} is stale", path.display());
            }
        }
    }
}
