//! Property tests of the pure cores (no local stack needed): the pgoutput
//! decoder never panics and reads back what a test-only encoder wrote; value
//! rendering never panics and writes valid JSON whenever it succeeds; the
//! ack tracker confirms exactly the transactions whose records, and those of
//! every earlier transaction, were all acknowledged, in any order.
#![allow(clippy::unwrap_used)]

use bytes::Bytes;
use cdc_reader::ack::AckTracker;
use cdc_reader::change::{Column, Datum, Lsn};
use cdc_reader::pgoutput::{Message, OldKind, RelationColumn, ReplicationFrame, Tuple, TupleValue};
use cdc_reader::value::{DecimalMode, oid, write_datum, write_text};
use proptest::collection::vec;
use proptest::prelude::*;

/// pgoutput v1 bytes of `message`: the inverse of [`Message::parse`].
fn encode(message: &Message) -> Vec<u8> {
    let mut out = Vec::new();
    match message {
        Message::Begin {
            final_lsn,
            commit_time,
            xid,
        } => {
            out.push(b'B');
            out.extend_from_slice(&final_lsn.to_be_bytes());
            out.extend_from_slice(&commit_time.to_be_bytes());
            out.extend_from_slice(&xid.to_be_bytes());
        }
        Message::Commit {
            flags,
            commit_lsn,
            end_lsn,
            commit_time,
        } => {
            out.push(b'C');
            out.push(*flags);
            out.extend_from_slice(&commit_lsn.to_be_bytes());
            out.extend_from_slice(&end_lsn.to_be_bytes());
            out.extend_from_slice(&commit_time.to_be_bytes());
        }
        Message::Origin { commit_lsn, name } => {
            out.push(b'O');
            out.extend_from_slice(&commit_lsn.to_be_bytes());
            cstr(&mut out, name);
        }
        Message::Relation {
            oid,
            namespace,
            name,
            replica_identity,
            columns,
        } => {
            out.push(b'R');
            out.extend_from_slice(&oid.to_be_bytes());
            cstr(&mut out, namespace);
            cstr(&mut out, name);
            out.push(*replica_identity);
            out.extend_from_slice(&u16::try_from(columns.len()).unwrap().to_be_bytes());
            for c in columns {
                out.push(u8::from(c.is_key));
                cstr(&mut out, &c.name);
                out.extend_from_slice(&c.type_oid.to_be_bytes());
                out.extend_from_slice(&c.type_modifier.to_be_bytes());
            }
        }
        Message::Type {
            oid,
            namespace,
            name,
        } => {
            out.push(b'Y');
            out.extend_from_slice(&oid.to_be_bytes());
            cstr(&mut out, namespace);
            cstr(&mut out, name);
        }
        Message::Insert { oid, new } => {
            out.push(b'I');
            out.extend_from_slice(&oid.to_be_bytes());
            out.push(b'N');
            tuple(&mut out, new);
        }
        Message::Update { oid, old, new } => {
            out.push(b'U');
            out.extend_from_slice(&oid.to_be_bytes());
            if let Some((kind, old)) = old {
                out.push(old_tag(*kind));
                tuple(&mut out, old);
            }
            out.push(b'N');
            tuple(&mut out, new);
        }
        Message::Delete { oid, old } => {
            out.push(b'D');
            out.extend_from_slice(&oid.to_be_bytes());
            out.push(old_tag(old.0));
            tuple(&mut out, &old.1);
        }
        Message::Truncate { options, oids } => {
            out.push(b'T');
            out.extend_from_slice(&u32::try_from(oids.len()).unwrap().to_be_bytes());
            out.push(*options);
            for oid in oids {
                out.extend_from_slice(&oid.to_be_bytes());
            }
        }
        Message::LogicalMessage {
            transactional,
            lsn,
            prefix,
            content,
        } => {
            out.push(b'M');
            out.push(u8::from(*transactional));
            out.extend_from_slice(&lsn.to_be_bytes());
            cstr(&mut out, prefix);
            out.extend_from_slice(&u32::try_from(content.len()).unwrap().to_be_bytes());
            out.extend_from_slice(content);
        }
    }
    out
}

fn cstr(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(s.as_bytes());
    out.push(0);
}

fn old_tag(kind: OldKind) -> u8 {
    match kind {
        OldKind::Key => b'K',
        OldKind::Full => b'O',
    }
}

fn tuple(out: &mut Vec<u8>, values: &Tuple) {
    out.extend_from_slice(&u16::try_from(values.len()).unwrap().to_be_bytes());
    for v in values {
        match v {
            TupleValue::Null => out.push(b'n'),
            TupleValue::UnchangedToast => out.push(b'u'),
            TupleValue::Text(data) | TupleValue::Binary(data) => {
                out.push(if matches!(v, TupleValue::Text(_)) {
                    b't'
                } else {
                    b'b'
                });
                out.extend_from_slice(&u32::try_from(data.len()).unwrap().to_be_bytes());
                out.extend_from_slice(data);
            }
        }
    }
}

/// Names as the server sends them: any UTF-8 without NUL.
fn name() -> impl Strategy<Value = String> {
    "[^\u{0}]{0,12}"
}

fn bytes(max: usize) -> impl Strategy<Value = Bytes> {
    vec(any::<u8>(), 0..max).prop_map(Bytes::from)
}

fn tuple_value() -> impl Strategy<Value = TupleValue> {
    prop_oneof![
        Just(TupleValue::Null),
        Just(TupleValue::UnchangedToast),
        bytes(24).prop_map(TupleValue::Text),
        bytes(24).prop_map(TupleValue::Binary),
    ]
}

fn tuple_data() -> impl Strategy<Value = Tuple> {
    vec(tuple_value(), 0..6)
}

fn old_kind() -> impl Strategy<Value = OldKind> {
    prop_oneof![Just(OldKind::Key), Just(OldKind::Full)]
}

fn relation_column() -> impl Strategy<Value = RelationColumn> {
    (any::<bool>(), name(), any::<u32>(), any::<i32>()).prop_map(
        |(is_key, name, type_oid, type_modifier)| RelationColumn {
            is_key,
            name,
            type_oid,
            type_modifier,
        },
    )
}

/// Every message kind the reader decodes, with arbitrary contents.
fn message() -> impl Strategy<Value = Message> {
    prop_oneof![
        (any::<u64>(), any::<i64>(), any::<u32>()).prop_map(|(final_lsn, commit_time, xid)| {
            Message::Begin {
                final_lsn,
                commit_time,
                xid,
            }
        }),
        (any::<u8>(), any::<u64>(), any::<u64>(), any::<i64>()).prop_map(
            |(flags, commit_lsn, end_lsn, commit_time)| Message::Commit {
                flags,
                commit_lsn,
                end_lsn,
                commit_time,
            }
        ),
        (any::<u64>(), name()).prop_map(|(commit_lsn, name)| Message::Origin { commit_lsn, name }),
        (
            any::<u32>(),
            name(),
            name(),
            prop::sample::select(b"dnfi".to_vec()),
            vec(relation_column(), 0..6)
        )
            .prop_map(|(oid, namespace, name, replica_identity, columns)| {
                Message::Relation {
                    oid,
                    namespace,
                    name,
                    replica_identity,
                    columns,
                }
            }),
        (any::<u32>(), name(), name()).prop_map(|(oid, namespace, name)| Message::Type {
            oid,
            namespace,
            name
        }),
        (any::<u32>(), tuple_data()).prop_map(|(oid, new)| Message::Insert { oid, new }),
        (
            any::<u32>(),
            prop::option::of((old_kind(), tuple_data())),
            tuple_data()
        )
            .prop_map(|(oid, old, new)| Message::Update { oid, old, new }),
        (any::<u32>(), old_kind(), tuple_data()).prop_map(|(oid, kind, old)| Message::Delete {
            oid,
            old: (kind, old)
        }),
        (any::<u8>(), vec(any::<u32>(), 0..8))
            .prop_map(|(options, oids)| Message::Truncate { options, oids }),
        (any::<bool>(), any::<u64>(), name(), bytes(32)).prop_map(
            |(transactional, lsn, prefix, content)| Message::LogicalMessage {
                transactional,
                lsn,
                prefix,
                content,
            }
        ),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn arbitrary_bytes_never_panic(data in vec(any::<u8>(), 0..128)) {
        let _ = Message::parse(Bytes::from(data.clone()));
        let _ = ReplicationFrame::parse(Bytes::from(data));
    }

    /// Random bodies behind a valid tag reach each message kind's parser.
    #[test]
    fn arbitrary_bodies_of_every_kind_never_panic(
        tag in prop::sample::select(b"BCORYIUDTMwk".to_vec()),
        body in vec(any::<u8>(), 0..128),
    ) {
        let mut data = vec![tag];
        data.extend_from_slice(&body);
        let _ = Message::parse(Bytes::from(data.clone()));
        let _ = ReplicationFrame::parse(Bytes::from(data));
    }

    #[test]
    fn messages_round_trip(message in message()) {
        let bytes = Bytes::from(encode(&message));
        prop_assert_eq!(&Message::parse(bytes.clone()).unwrap(), &message);
        // Inside an XLogData frame as the walsender sends it.
        let mut frame = vec![b'w'];
        frame.extend_from_slice(&7u64.to_be_bytes());
        frame.extend_from_slice(&9u64.to_be_bytes());
        frame.extend_from_slice(&11i64.to_be_bytes());
        frame.extend_from_slice(&bytes);
        let ReplicationFrame::XLogData { data, .. } = ReplicationFrame::parse(Bytes::from(frame)).unwrap() else {
            panic!("not an XLogData frame");
        };
        prop_assert_eq!(Message::parse(data).unwrap(), message);
    }

    /// A message cut short is an error, never a panic nor a different message.
    #[test]
    fn truncated_messages_are_errors(message in message(), cut in any::<prop::sample::Index>()) {
        let bytes = Bytes::from(encode(&message));
        let n = cut.index(bytes.len());
        prop_assert!(Message::parse(bytes.slice(..n)).is_err());
    }

    /// One changed byte may change the message but must never panic.
    #[test]
    fn corrupted_messages_never_panic(
        message in message(),
        at in any::<prop::sample::Index>(),
        byte in any::<u8>(),
    ) {
        let mut bytes = encode(&message);
        let i = at.index(bytes.len());
        bytes[i] = byte;
        let _ = Message::parse(Bytes::from(bytes));
    }
}

/// Every type the renderer treats specially, with the modifiers that change
/// its rendering, plus a custom type (rendered as a string).
fn rendered_type() -> impl Strategy<Value = (u32, i32)> {
    let plain = prop::sample::select(vec![
        oid::BOOL,
        oid::BYTEA,
        oid::CHAR,
        oid::NAME,
        oid::INT8,
        oid::INT2,
        oid::INT4,
        oid::TEXT,
        oid::OID,
        oid::JSON,
        oid::XML,
        oid::FLOAT4,
        oid::FLOAT8,
        oid::MONEY,
        oid::BPCHAR,
        oid::VARCHAR,
        oid::DATE,
        oid::TIME,
        oid::TIMESTAMP,
        oid::TIMESTAMPTZ,
        oid::INTERVAL,
        oid::TIMETZ,
        oid::BIT,
        oid::VARBIT,
        oid::NUMERIC,
        oid::UUID,
        oid::JSONB,
        16_500,
    ])
    .prop_map(|t| (t, -1));
    let array = prop::sample::select(vec![
        1000u32, 1001, 1002, 1003, 1005, 1007, 1009, 1014, 1015, 1016, 1021, 1022, 1028, 1115,
        1182, 1183, 1185, 1187, 1231, 1270, 1561, 1563, 143, 199, 791, 2951, 3807, 1040, 1041, 651,
    ])
    .prop_map(|t| (t, -1));
    let modified = prop_oneof![
        Just((oid::BIT, 1)),
        Just((1561, 1)),
        // numeric(10,2), numeric(5,0), numeric(1000,1000): typmod is
        // ((precision << 16) | scale) + 4.
        Just((oid::NUMERIC, (10 << 16 | 2) + 4)),
        Just((oid::NUMERIC, (5 << 16) + 4)),
        Just((oid::NUMERIC, (1000 << 16 | 1000) + 4)),
        Just((1231, (10 << 16 | 2) + 4)),
        // Any numeric(p,s) PostgreSQL 15 accepts (the scale may be negative).
        (1i32..=1000, -1000i32..=1000)
            .prop_map(|(p, s)| (oid::NUMERIC, (p << 16 | (s & 0x7ff)) + 4)),
        // And any typmod at all.
        (Just(oid::NUMERIC), any::<i32>()),
    ];
    prop_oneof![plain, array, modified]
}

/// Text close to what Postgres prints (digits, signs, separators, array
/// syntax, special words), so values get past the first checks.
fn valueish_text() -> impl Strategy<Value = String> {
    let piece = prop::sample::select(vec![
        "0",
        "1",
        "7",
        "9",
        "00",
        "-",
        "+",
        ".",
        ":",
        " ",
        "T",
        "Z",
        "e",
        "E",
        "\\x",
        "ab",
        "{",
        "}",
        ",",
        "\"",
        "\\",
        "NULL",
        "NaN",
        "Infinity",
        "-Infinity",
        "infinity",
        "-infinity",
        "t",
        "f",
        "$",
        "(",
        ")",
        "BC",
        "2024-02-29",
        "12:34:56.789",
        "+05:30",
        "1 year 2 mons 3 days 04:05:06",
        "@",
        "ago",
        "[1:2]=",
        "é",
        "\u{0}",
    ]);
    vec(piece, 0..12).prop_map(|pieces| pieces.concat())
}

fn decimal_mode() -> impl Strategy<Value = DecimalMode> {
    prop_oneof![
        Just(DecimalMode::String),
        Just(DecimalMode::Double),
        Just(DecimalMode::Precise)
    ]
}

fn assert_renders_json(text: &str, type_oid: u32, type_modifier: i32, mode: DecimalMode) {
    let mut out = Vec::new();
    if write_text(&mut out, text, type_oid, type_modifier, mode).is_ok() {
        let parsed = serde_json::from_slice::<serde_json::Value>(&out);
        assert!(
            parsed.is_ok(),
            "type {type_oid} modifier {type_modifier} {mode:?}: {text:?} rendered as invalid JSON {:?}",
            String::from_utf8_lossy(&out)
        );
    }
}

/// Text for the renderer: anything printable, text close to what Postgres
/// prints, and number-like text.
fn rendered_text() -> impl Strategy<Value = String> {
    prop_oneof![
        "\\PC{0,40}",
        valueish_text(),
        "[-+]?[0-9]{0,4}(\\.[0-9]{0,3})?([eE][-+]?[0-9]{1,3})?",
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(9000))]

    #[test]
    fn any_text_renders_valid_json_or_an_error(
        (type_oid, type_modifier) in rendered_type(),
        text in rendered_text(),
        mode in decimal_mode(),
    ) {
        assert_renders_json(&text, type_oid, type_modifier, mode);
    }

    /// Bytes straight from the wire (not necessarily UTF-8).
    #[test]
    fn any_bytes_as_a_datum_never_panic(
        (type_oid, type_modifier) in rendered_type(),
        data in vec(any::<u8>(), 0..40),
        mode in decimal_mode(),
    ) {
        let column = Column {
            name: "c".to_owned(),
            type_oid,
            type_modifier,
            is_key: false,
        };
        let mut out = Vec::new();
        if write_datum(&mut out, &Datum::Text(Bytes::from(data)), &column, mode).is_ok() {
            prop_assert!(serde_json::from_slice::<serde_json::Value>(&out).is_ok());
        }
    }
}

/// One step of the sink's side of the tracker: records and transaction ends
/// in WAL order.
#[derive(Debug, Clone, Copy)]
enum Produced {
    /// A record of transaction `tx` was enqueued.
    Sent { tx: usize, record: usize },
    /// Transaction `tx` ended.
    End { tx: usize },
}

/// End LSN of transaction `tx` (increasing, as WAL positions are).
fn end_lsn(tx: usize) -> Lsn {
    (tx as Lsn + 1) * 100
}

/// Transactions (records per transaction, some empty), an acknowledgement
/// order of all records, and how far the sink runs ahead before each ack.
fn ack_schedule() -> impl Strategy<Value = (Vec<usize>, Vec<(usize, usize)>, Vec<usize>)> {
    vec(0usize..5, 1..10).prop_flat_map(|sizes| {
        let records: Vec<(usize, usize)> = sizes
            .iter()
            .enumerate()
            .flat_map(|(tx, &n)| (0..n).map(move |r| (tx, r)))
            .collect();
        let n = records.len();
        (
            Just(sizes),
            Just(records).prop_shuffle(),
            vec(0usize..4, n..=n),
        )
    })
}

/// Highest LSN that may be confirmed: the end of the last transaction of the
/// longest prefix of ended transactions whose records are all acknowledged.
fn may_confirm(sizes: &[usize], ended: &[bool], acked: &[Vec<bool>]) -> Lsn {
    let mut lsn = 0;
    for tx in 0..sizes.len() {
        if !ended[tx] || acked[tx].iter().any(|a| !a) {
            break;
        }
        lsn = end_lsn(tx);
    }
    lsn
}

/// The sink's side and Kafka's side of one source, driving a tracker and
/// checking it against the model after every step.
struct AckRun {
    sizes: Vec<usize>,
    produced: Vec<Produced>,
    next: usize,
    tracker: AckTracker,
    seqs: Vec<Vec<Option<u64>>>,
    acked: Vec<Vec<bool>>,
    ended: Vec<bool>,
}

impl AckRun {
    fn new(sizes: Vec<usize>) -> Self {
        let produced = sizes
            .iter()
            .enumerate()
            .flat_map(|(tx, &n)| {
                (0..n)
                    .map(move |record| Produced::Sent { tx, record })
                    .chain(std::iter::once(Produced::End { tx }))
            })
            .collect();
        AckRun {
            seqs: sizes.iter().map(|&n| vec![None; n]).collect(),
            acked: sizes.iter().map(|&n| vec![false; n]).collect(),
            ended: vec![false; sizes.len()],
            sizes,
            produced,
            next: 0,
            tracker: AckTracker::new(),
        }
    }

    /// The sink takes its next step in WAL order, if any is left.
    fn produce(&mut self) -> Result<(), TestCaseError> {
        let Some(&step) = self.produced.get(self.next) else {
            return Ok(());
        };
        self.next += 1;
        match step {
            Produced::Sent { tx, record } => self.seqs[tx][record] = Some(self.tracker.sent()),
            Produced::End { tx } => {
                self.tracker.end_transaction(end_lsn(tx));
                self.ended[tx] = true;
            }
        }
        self.check()
    }

    /// Kafka acknowledges one record (sent first if the sink had not yet).
    fn ack(&mut self, tx: usize, record: usize) -> Result<(), TestCaseError> {
        while self.seqs[tx][record].is_none() {
            self.produce()?;
        }
        let before = self.tracker.confirmed();
        let moved = self
            .tracker
            .acked(self.seqs[tx][record].unwrap_or(u64::MAX));
        self.acked[tx][record] = true;
        let confirmed = self.tracker.confirmed();
        prop_assert_eq!(moved, (confirmed > before).then_some(confirmed));
        self.check()
    }

    fn check(&self) -> Result<(), TestCaseError> {
        let bound = may_confirm(&self.sizes, &self.ended, &self.acked);
        let confirmed = self.tracker.confirmed();
        prop_assert!(
            confirmed <= bound,
            "confirmed {confirmed} past an unacknowledged record (may confirm {bound})"
        );
        // Eager: whatever may be confirmed is.
        prop_assert_eq!(confirmed, bound);
        Ok(())
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn acks_in_any_order_never_confirm_past_an_unacknowledged_record(
        (sizes, ack_order, run_ahead) in ack_schedule(),
    ) {
        let last = end_lsn(sizes.len() - 1);
        let mut run = AckRun::new(sizes);
        for (&(tx, record), &ahead) in ack_order.iter().zip(&run_ahead) {
            // The sink may run ahead of Kafka's acknowledgements.
            for _ in 0..ahead {
                run.produce()?;
            }
            run.ack(tx, record)?;
        }
        while run.next < run.produced.len() {
            run.produce()?;
        }
        prop_assert_eq!(run.tracker.confirmed(), last);
        prop_assert_eq!(run.tracker.in_flight(), 0);
    }
}
