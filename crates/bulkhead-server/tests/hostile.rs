//! Hostile input at the HTTP surface: a table of malformed, oversized and forged requests, each
//! with the exact status and `error.code` it must get; after each one, nothing was charged or
//! changed and the server still answers. Then a property test throws random bytes and random
//! JSON at the two busiest entry points.

mod common;

use std::collections::BTreeSet;

use bulkhead_core::ApiKey;
use common::*;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use serde_json::{Value, json};

/// How a row authenticates.
#[derive(Clone, Debug)]
enum A {
    None,
    Admin,
    /// The victim's own (valid) key.
    Victim,
    /// The victim's key with one checksum character changed.
    WrongChecksum,
    /// A well-formed key (good checksum) that the server never issued.
    Unknown,
    /// A raw `Authorization` header value.
    Raw(Vec<u8>),
}

struct Row {
    name: String,
    method: &'static str,
    path: String,
    auth: A,
    headers: Vec<(&'static str, Vec<u8>)>,
    body: Vec<u8>,
    status: u16,
    /// `None` for the few rows that must succeed (the clamped `limit`).
    code: Option<&'static str>,
}

fn row(
    name: impl Into<String>,
    method: &'static str,
    path: impl Into<String>,
    auth: A,
    body: impl Into<Vec<u8>>,
) -> Row {
    Row {
        name: name.into(),
        method,
        path: path.into(),
        auth,
        headers: Vec::new(),
        body: body.into(),
        status: 400,
        code: Some("invalid_request"),
    }
}

impl Row {
    fn want(mut self, status: u16, code: &'static str) -> Row {
        self.status = status;
        self.code = Some(code);
        self
    }
    fn ok(mut self) -> Row {
        self.status = 200;
        self.code = None;
        self
    }
    fn header(mut self, name: &'static str, value: impl Into<Vec<u8>>) -> Row {
        self.headers.push((name, value.into()));
        self
    }
}

/// Hostile amounts: refused everywhere an amount goes.
const BAD_AMOUNTS: &[&str] = &[
    "-1",
    r#""-1""#,
    "1e3",
    r#""1e3""#,
    "1E3",
    "1.5e2",
    r#""NaN""#,
    r#""Infinity""#,
    r#""-Infinity""#,
    r#""1.0000001""#,
    "1.0000001",
    r#""10000000000000""#,
    "10000000000000",
    r#""1000000000000.000001""#,
    "99999999999999999999999999",
    r#""""#,
    r#""abc""#,
    "true",
    "false",
    "{}",
    "[]",
    r#"["1"]"#,
    r#"{"amount":"1"}"#,
    "-0",
    r#""-0""#,
    r#"" 1""#,
    r#""1 ""#,
    r#""+1""#,
    r#"".5""#,
    r#""5.""#,
    r#""1,5""#,
    r#""0x10""#,
    r#""1_000""#,
    r#""٣""#,
    r#""１""#,
];
/// Zero, refused where a spend or hold is meant.
const ZERO_AMOUNTS: &[&str] = &["0", r#""0""#, r#""0.00""#, "0.000000", r#""0.000000""#];

fn spend_with(amount: &str) -> String {
    format!(r#"{{"scope":"pay:x","amount":{amount}}}"#)
}

fn create_with(handle: &str, scopes: &str, cap: &str, extra: &str) -> String {
    format!(r#"{{"handle":{handle},"scopes":{scopes},"spending_cap":{cap}{extra}}}"#)
}

fn big_body() -> Vec<u8> {
    // A valid JSON object of 2 MiB: the size alone must refuse it.
    let mut b = br#"{"scope":"pay:x","amount":"1","memo":""#.to_vec();
    b.extend(std::iter::repeat_n(b'x', 2 * 1024 * 1024));
    b.extend(br#""}"#);
    b
}

fn rows(hold: &str, key: &str) -> Vec<Row> {
    let mut v: Vec<Row> = Vec::new();
    let n = nested(10_000);

    // --- Amounts, in every place an amount goes.
    for a in BAD_AMOUNTS.iter().chain(ZERO_AMOUNTS) {
        v.push(
            row(format!("spend amount {a}"), "POST", "/v1/spend", A::Victim, spend_with(a)).want(400, "invalid_amount"),
        );
        v.push(
            row(
                format!("hold amount {a}"),
                "POST",
                "/v1/holds",
                A::Victim,
                format!(r#"{{"scope":"pay:x","amount":{a}}}"#),
            )
            .want(400, "invalid_amount"),
        );
    }
    for a in BAD_AMOUNTS.iter().chain(&["null"]) {
        v.push(
            row(
                format!("capture amount {a}"),
                "POST",
                format!("/v1/holds/{hold}/capture"),
                A::Victim,
                format!(r#"{{"amount":{a}}}"#),
            )
            .want(400, "invalid_amount"),
        );
        v.push(
            row(
                format!("create spending_cap {a}"),
                "POST",
                "/v1/agents",
                A::Admin,
                create_with(r#""new-agent""#, r#"["a:b"]"#, a, ""),
            )
            .want(400, "invalid_amount"),
        );
        v.push(
            row(
                format!("child spending_cap {a}"),
                "POST",
                "/v1/agents",
                A::Victim,
                create_with(r#""new-child""#, r#"["a:b"]"#, a, ""),
            )
            .want(400, "invalid_amount"),
        );
    }
    for a in BAD_AMOUNTS {
        for field in ["per_tx_limit", "lifetime_cap"] {
            v.push(
                row(
                    format!("create {field} {a}"),
                    "POST",
                    "/v1/agents",
                    A::Admin,
                    create_with(r#""new-agent""#, r#"["a:b"]"#, r#""10""#, &format!(r#","{field}":{a}"#)),
                )
                .want(400, "invalid_amount"),
            );
        }
        for field in ["spending_cap", "per_tx_limit", "lifetime_cap"] {
            v.push(
                row(
                    format!("patch {field} {a}"),
                    "PATCH",
                    "/v1/agents/victim",
                    A::Admin,
                    format!(r#"{{"{field}":{a}}}"#),
                )
                .want(400, "invalid_amount"),
            );
        }
    }

    // --- Bodies that are not the JSON object the call takes.
    let spend_bodies: &[(&str, &[u8])] = &[
        ("broken JSON", br#"{"scope":"pay:x","amount":"1""#),
        ("single quotes", br#"{'scope':'pay:x','amount':'1'}"#),
        ("trailing comma", br#"{"scope":"pay:x","amount":"1",}"#),
        ("trailing garbage", br#"{"scope":"pay:x","amount":"1"} x"#),
        ("two objects", br#"{"scope":"pay:x","amount":"1"}{"scope":"pay:x","amount":"1"}"#),
        ("JSON array of the fields", br#"["pay:x","1",null]"#),
        ("JSON array of the fields, no memo", br#"["pay:x","1"]"#),
        ("JSON array of an object", br#"[{"scope":"pay:x","amount":"1"}]"#),
        ("JSON null", b"null"),
        ("JSON string", br#""pay:x""#),
        ("JSON number", b"1"),
        ("JSON true", b"true"),
        ("empty object", b"{}"),
        ("empty body", b""),
        ("whitespace body", b" \n\t "),
        ("missing amount", br#"{"scope":"pay:x"}"#),
        ("missing scope", br#"{"amount":"1"}"#),
        ("duplicate scope", br#"{"scope":"a:b","scope":"a:b","amount":"1"}"#),
        ("duplicate amount", br#"{"scope":"a:b","amount":"1","amount":"1"}"#),
        ("duplicate memo", br#"{"scope":"a:b","amount":"1","memo":"x","memo":"x"}"#),
        ("unknown field", br#"{"scope":"pay:x","amount":"1","extra":true}"#),
        ("unknown field agent", br#"{"scope":"pay:x","amount":"1","agent":"victim"}"#),
        ("case-varied field", br#"{"Scope":"pay:x","amount":"1"}"#),
        ("scope is a number", br#"{"scope":1,"amount":"1"}"#),
        ("scope is an array", br#"{"scope":["pay:x"],"amount":"1"}"#),
        ("memo is a number", br#"{"scope":"pay:x","amount":"1","memo":5}"#),
        ("invalid UTF-8", b"{\"scope\":\"pay:\xff\",\"amount\":\"1\"}"),
        ("lone surrogate", br#"{"scope":"pay:x","amount":"1","memo":"\ud800"}"#),
        ("byte order mark", b"\xef\xbb\xbf{\"scope\":\"pay:x\",\"amount\":\"1\"}"),
        ("NUL before body", b"\0{\"scope\":\"pay:x\",\"amount\":\"1\"}"),
        ("raw NaN", br#"{"scope":"pay:x","amount":NaN}"#),
        ("raw Infinity", br#"{"scope":"pay:x","amount":Infinity}"#),
        ("comment", br#"{"scope":"pay:x", /* c */ "amount":"1"}"#),
    ];
    for (name, body) in spend_bodies {
        v.push(row(format!("spend body: {name}"), "POST", "/v1/spend", A::Victim, body.to_vec()));
        v.push(row(format!("hold body: {name}"), "POST", "/v1/holds", A::Victim, body.to_vec()));
    }
    v.push(row(
        "memo over 1000 chars",
        "POST",
        "/v1/spend",
        A::Victim,
        format!(r#"{{"scope":"pay:x","amount":"1","memo":"{}"}}"#, "m".repeat(1001)),
    ));
    v.push(row(
        "deep nesting in memo",
        "POST",
        "/v1/spend",
        A::Victim,
        format!(r#"{{"scope":"pay:x","amount":"1","memo":{n}}}"#),
    ));
    v.push(row(
        "deep nesting in unknown field",
        "POST",
        "/v1/spend",
        A::Victim,
        format!(r#"{{"scope":"pay:x","amount":"1","x":{n}}}"#),
    ));
    v.push(row("deep nesting as the body", "POST", "/v1/spend", A::Victim, n.clone()));
    v.push(row(
        "deep object nesting as the body",
        "POST",
        "/v1/spend",
        A::Victim,
        format!("{}{}", r#"{"a":"#.repeat(10_000), "}".repeat(10_000)),
    ));
    v.push(row("deep nesting in amount", "POST", "/v1/spend", A::Victim, spend_with(&n)).want(400, "invalid_amount"));
    v.push(
        row(
            "deep object nesting in amount",
            "POST",
            "/v1/spend",
            A::Victim,
            spend_with(&format!("{}1{}", r#"{"a":"#.repeat(10_000), "}".repeat(10_000))),
        )
        .want(400, "invalid_amount"),
    );
    v.push(
        row(
            "deep nesting in capture amount",
            "POST",
            format!("/v1/holds/{hold}/capture"),
            A::Victim,
            format!(r#"{{"amount":{n}}}"#),
        )
        .want(400, "invalid_amount"),
    );
    v.push(row(
        "capture unknown field",
        "POST",
        format!("/v1/holds/{hold}/capture"),
        A::Victim,
        r#"{"amount":"0.5","x":1}"#,
    ));
    v.push(row("capture array body", "POST", format!("/v1/holds/{hold}/capture"), A::Victim, r#"["0.5"]"#));
    v.push(row(
        "capture duplicate amount",
        "POST",
        format!("/v1/holds/{hold}/capture"),
        A::Victim,
        r#"{"amount":"0.5","amount":"0.5"}"#,
    ));
    v.push(row(
        "release with a body field",
        "POST",
        format!("/v1/holds/{hold}/release"),
        A::Victim,
        r#"{"amount":"1"}"#,
    ));
    v.push(row("release array body", "POST", format!("/v1/holds/{hold}/release"), A::Victim, "[]"));

    // --- Oversized bodies.
    for (method, path, auth) in [
        ("POST", "/v1/spend".to_string(), A::Victim),
        ("POST", "/v1/holds".to_string(), A::Victim),
        ("POST", format!("/v1/holds/{hold}/capture"), A::Victim),
        ("POST", format!("/v1/holds/{hold}/release"), A::Victim),
        ("POST", "/v1/agents".to_string(), A::Admin),
        ("PATCH", "/v1/agents/victim".to_string(), A::Admin),
        ("POST", "/v1/agents/victim/revoke".to_string(), A::Admin),
        ("POST", "/v1/agents/victim/keys".to_string(), A::Admin),
    ] {
        v.push(
            row(format!("2 MiB body to {method} {path}"), method, path, auth, big_body()).want(413, "body_too_large"),
        );
    }
    let mut just_over = spend_with(r#""1""#).into_bytes();
    just_over.resize(1024 * 1024 + 1, b' ');
    v.push(row("1 MiB + 1 byte body", "POST", "/v1/spend", A::Victim, just_over).want(413, "body_too_large"));

    // --- Handles, scopes, windows on create (as admin, and as a parent agent).
    let long = format!(r#""{}""#, "a".repeat(65));
    for h in [
        r#""Agent""#,
        r#""AGENT""#,
        r#""-lead""#,
        r#"".dot""#,
        r#""_under""#,
        r#""ägent""#,
        r#""é""#,
        r#""agent😀""#,
        r#""""#,
        r#""a b""#,
        r#""a/b""#,
        r#""a\nb""#,
        r#""a:b""#,
        r#""a\u0000""#,
        long.as_str(),
    ] {
        v.push(
            row(
                format!("create handle {h}"),
                "POST",
                "/v1/agents",
                A::Admin,
                create_with(h, r#"["a:b"]"#, r#""10""#, ""),
            )
            .want(400, "invalid_handle"),
        );
        v.push(
            row(
                format!("child handle {h}"),
                "POST",
                "/v1/agents",
                A::Victim,
                create_with(h, r#"["a:b"]"#, r#""10""#, ""),
            )
            .want(400, "invalid_handle"),
        );
    }
    for h in ["123", "null", r#"["a"]"#] {
        v.push(row(
            format!("create handle {h}"),
            "POST",
            "/v1/agents",
            A::Admin,
            create_with(h, r#"["a:b"]"#, r#""10""#, ""),
        ));
    }
    let too_many: Vec<String> = (0..65).map(|i| format!("r{i}:a")).collect();
    let too_many = serde_json::to_string(&too_many).unwrap();
    let long_scope = format!(r#"["{}:b"]"#, "a".repeat(127));
    for s in [
        r#"["A:b"]"#,
        r#"["a"]"#,
        r#"["a:"]"#,
        r#"[":b"]"#,
        r#"["a:b:c"]"#,
        r#"["re*:x"]"#,
        r#"["a:*x"]"#,
        r#"["**"]"#,
        r#"[""]"#,
        r#"["a b:c"]"#,
        r#"["é:x"]"#,
        r#"["a:b "]"#,
        &long_scope,
        &too_many,
    ] {
        v.push(
            row(
                format!("create scopes {s:.40}"),
                "POST",
                "/v1/agents",
                A::Admin,
                create_with(r#""new-agent""#, s, r#""10""#, ""),
            )
            .want(400, "invalid_scope"),
        );
    }
    for s in [r#""a:b""#, "null", r#"[1]"#, r#"{"a":"b"}"#] {
        v.push(row(
            format!("create scopes {s}"),
            "POST",
            "/v1/agents",
            A::Admin,
            create_with(r#""new-agent""#, s, r#""10""#, ""),
        ));
    }
    for s in [
        r#""A:b""#,
        r#""a""#,
        r#""a:*""#,
        r#""*:b""#,
        r#""*""#,
        r#""""#,
        r#""a:b:c""#,
        r#""pay:x ""#,
        r#""pay:x\n""#,
        r#""pay:é""#,
    ] {
        v.push(
            row(format!("spend scope {s}"), "POST", "/v1/spend", A::Victim, format!(r#"{{"scope":{s},"amount":"1"}}"#))
                .want(400, "invalid_scope"),
        );
        v.push(
            row(format!("hold scope {s}"), "POST", "/v1/holds", A::Victim, format!(r#"{{"scope":{s},"amount":"1"}}"#))
                .want(400, "invalid_scope"),
        );
    }
    v.push(
        row(
            "spend scope of 129 chars",
            "POST",
            "/v1/spend",
            A::Victim,
            format!(r#"{{"scope":"{}:b","amount":"1"}}"#, "a".repeat(127)),
        )
        .want(400, "invalid_scope"),
    );
    for w in ["0s", "1w", "-1h", "1.5h", "", "24", "h", "1H", " 1h", "1h ", "0x10s", "99999999999999d", "36501d", "１h"]
    {
        let wj = json!(w).to_string();
        v.push(
            row(
                format!("create window {w:?}"),
                "POST",
                "/v1/agents",
                A::Admin,
                create_with(r#""new-agent""#, r#"["a:b"]"#, r#""10""#, &format!(r#","window":{wj}"#)),
            )
            .want(400, "invalid_window"),
        );
        v.push(
            row(format!("patch window {w:?}"), "PATCH", "/v1/agents/victim", A::Admin, format!(r#"{{"window":{wj}}}"#))
                .want(400, "invalid_window"),
        );
        v.push(
            row(
                format!("create rate_limit.per {w:?}"),
                "POST",
                "/v1/agents",
                A::Admin,
                create_with(
                    r#""new-agent""#,
                    r#"["a:b"]"#,
                    r#""10""#,
                    &format!(r#","rate_limit":{{"requests":5,"per":{wj}}}"#),
                ),
            )
            .want(400, "invalid_window"),
        );
        v.push(row(
            format!("create expires_in {w:?}"),
            "POST",
            "/v1/agents",
            A::Admin,
            create_with(r#""new-agent""#, r#"["a:b"]"#, r#""10""#, &format!(r#","expires_in":{wj}"#)),
        ));
        v.push(row(
            format!("hold expires_in {w:?}"),
            "POST",
            "/v1/holds",
            A::Victim,
            format!(r#"{{"scope":"pay:x","amount":"1","expires_in":{wj}}}"#),
        ));
    }
    for e in ["25h", "86401s", "1441m", "2d", "100d"] {
        v.push(row(
            format!("hold expires_in {e} (over 24h)"),
            "POST",
            "/v1/holds",
            A::Victim,
            format!(r#"{{"scope":"pay:x","amount":"1","expires_in":"{e}"}}"#),
        ));
    }
    v.push(row(
        "window is a number",
        "POST",
        "/v1/agents",
        A::Admin,
        create_with(r#""new-agent""#, r#"["a:b"]"#, r#""10""#, r#","window":3600"#),
    ));

    // --- Other create/patch fields.
    let create_extras: &[(&str, String)] = &[
        ("unknown field", r#","owner":"me""#.into()),
        ("parent field", r#","parent":"victim""#.into()),
        ("key field", r#","key":"bk_x""#.into()),
        ("status field", r#","status":"active""#.into()),
        ("duplicate handle key", r#","handle":"new-agent""#.into()),
        ("duplicate spending_cap", r#","spending_cap":"10""#.into()),
        ("rate_limit requests 0", r#","rate_limit":{"requests":0,"per":"1m"}"#.into()),
        ("rate_limit requests -1", r#","rate_limit":{"requests":-1,"per":"1m"}"#.into()),
        ("rate_limit requests huge", r#","rate_limit":{"requests":1000001,"per":"1m"}"#.into()),
        ("rate_limit requests float", r#","rate_limit":{"requests":1.5,"per":"1m"}"#.into()),
        ("rate_limit unknown field", r#","rate_limit":{"requests":1,"per":"1m","burst":9}"#.into()),
        ("rate_limit missing per", r#","rate_limit":{"requests":1}"#.into()),
        ("rate_limit as an array", r#","rate_limit":[5,"1m"]"#.into()),
        ("rate_limit duplicate key", r#","rate_limit":{"requests":5,"requests":6,"per":"1m"}"#.into()),
        ("breaker as an array", r#","breaker":[50]"#.into()),
        ("breaker denials -1", r#","breaker":{"denials":-1}"#.into()),
        ("breaker unknown field", r#","breaker":{"denials":5,"x":1}"#.into()),
        ("labels number value", r#","labels":{"team":1}"#.into()),
        ("labels null value", r#","labels":{"team":null}"#.into()),
        ("labels array", r#","labels":["team"]"#.into()),
        ("labels duplicate key", r#","labels":{"team":"a","team":"b"}"#.into()),
        ("labels empty key", r#","labels":{"":"a"}"#.into()),
        ("labels long value", format!(r#","labels":{{"team":"{}"}}"#, "v".repeat(257))),
        ("labels 65 entries", {
            let m: serde_json::Map<String, Value> = (0..65).map(|i| (format!("k{i}"), json!("v"))).collect();
            format!(r#","labels":{}"#, Value::Object(m))
        }),
        ("labels deep nesting", format!(r#","labels":{{"team":{n}}}"#)),
        ("unknown field deep nesting", format!(r#","x":{n}"#)),
    ];
    for (name, extra) in create_extras {
        v.push(row(
            format!("create {name}"),
            "POST",
            "/v1/agents",
            A::Admin,
            create_with(r#""new-agent""#, r#"["a:b"]"#, r#""10""#, extra),
        ));
        v.push(row(
            format!("child {name}"),
            "POST",
            "/v1/agents",
            A::Victim,
            create_with(r#""new-child""#, r#"["a:b"]"#, r#""10""#, extra),
        ));
    }
    let create_bodies: &[(&str, String)] = &[
        ("missing spending_cap", r#"{"handle":"new-agent","scopes":["a:b"]}"#.into()),
        ("missing scopes", r#"{"handle":"new-agent","spending_cap":"10"}"#.into()),
        ("missing handle", r#"{"scopes":["a:b"],"spending_cap":"10"}"#.into()),
        ("empty body", String::new()),
        ("JSON array of the fields", r#"["new-agent",["a:b"],"10",null,null,null,null,null,null,null]"#.into()),
        ("JSON array of an object", r#"[{"handle":"new-agent","scopes":["a:b"],"spending_cap":"10"}]"#.into()),
        ("broken JSON", r#"{"handle":"new-agent","scopes":["a:b"],"spending_cap":"10""#.into()),
        ("scopes deep nesting", format!(r#"{{"handle":"new-agent","scopes":{n},"spending_cap":"10"}}"#)),
    ];
    for (name, body) in create_bodies {
        v.push(row(format!("create {name}"), "POST", "/v1/agents", A::Admin, body.clone()));
        v.push(row(format!("child {name}"), "POST", "/v1/agents", A::Victim, body.replace("new-agent", "new-child")));
    }
    let patch_bodies: &[(&str, &str, u16, &str)] = &[
        ("unknown field", r#"{"handle":"other"}"#, 400, "invalid_request"),
        ("status field", r#"{"status":"active"}"#, 400, "invalid_request"),
        ("duplicate spending_cap", r#"{"spending_cap":"1","spending_cap":"2"}"#, 400, "invalid_request"),
        ("JSON array of the fields", r#"["5",null,null,null,null,null,null,null]"#, 400, "invalid_request"),
        ("broken JSON", r#"{"spending_cap":"5""#, 400, "invalid_request"),
        ("scopes", r#"{"scopes":["A:b"]}"#, 400, "invalid_scope"),
        ("scopes not a list", r#"{"scopes":"a:b"}"#, 400, "invalid_request"),
        ("rate_limit requests 0", r#"{"rate_limit":{"requests":0,"per":"1m"}}"#, 400, "invalid_request"),
        ("rate_limit per 0s", r#"{"rate_limit":{"requests":1,"per":"0s"}}"#, 400, "invalid_window"),
        ("rate_limit as an array", r#"{"rate_limit":[5,"1m"]}"#, 400, "invalid_request"),
        ("breaker as an array", r#"{"breaker":[3,"1m"]}"#, 400, "invalid_request"),
        ("labels number value", r#"{"labels":{"a":1}}"#, 400, "invalid_request"),
        ("breaker window 1w", r#"{"breaker":{"denials":3,"window":"1w"}}"#, 400, "invalid_window"),
    ];
    for &(name, body, status, code) in patch_bodies {
        v.push(row(format!("patch {name}"), "PATCH", "/v1/agents/victim", A::Admin, body).want(status, code));
    }

    // --- Credentials: every way of getting the header wrong, on agent and admin calls.
    let good_spend = spend_with(r#""1""#);
    let good_create = create_with(r#""new-agent""#, r#"["a:b"]"#, r#""10""#, "");
    let targets: Vec<(&'static str, String, String, bool)> = vec![
        ("POST", "/v1/spend".into(), good_spend.clone(), true),
        ("POST", "/v1/holds".into(), good_spend.clone(), true),
        ("POST", format!("/v1/holds/{hold}/capture"), r#"{"amount":"1"}"#.into(), true),
        ("POST", format!("/v1/holds/{hold}/release"), String::new(), true),
        ("GET", "/v1/me".into(), String::new(), true),
        ("GET", "/v1/me/audit".into(), String::new(), true),
        ("POST", "/v1/agents".into(), good_create.clone(), false),
        ("GET", "/v1/agents".into(), String::new(), false),
        ("GET", "/v1/agents/victim".into(), String::new(), false),
        ("PATCH", "/v1/agents/victim".into(), r#"{"spending_cap":"1"}"#.into(), false),
        ("POST", "/v1/agents/victim/revoke".into(), String::new(), false),
        ("POST", "/v1/agents/victim/keys".into(), String::new(), false),
        ("POST", "/v1/agents/victim/resume".into(), String::new(), false),
        ("GET", "/v1/agents/victim/audit".into(), String::new(), false),
        ("GET", "/v1/blast-radius".into(), String::new(), false),
    ];
    let bad_auths: Vec<(&str, A)> = vec![
        ("missing", A::None),
        ("Basic", A::Raw(b"Basic x".to_vec())),
        ("Basic of a key", A::Raw(format!("Basic {key}").into_bytes())),
        ("bare Bearer", A::Raw(b"Bearer".to_vec())),
        ("Bearer and space", A::Raw(b"Bearer ".to_vec())),
        ("Bearer and spaces", A::Raw(b"Bearer    ".to_vec())),
        ("empty header", A::Raw(Vec::new())),
        ("short key", A::Raw(b"Bearer bk_short".to_vec())),
        ("bk_ alone", A::Raw(b"Bearer bk_".to_vec())),
        ("wrong checksum", A::WrongChecksum),
        ("unknown key", A::Unknown),
        ("key plus a char", A::Raw(format!("Bearer {key}x").into_bytes())),
        ("key minus a char", A::Raw(format!("Bearer {}", &key[..key.len() - 1]).into_bytes())),
        ("key with prefix changed", A::Raw(format!("Bearer bK_{}", &key[3..]).into_bytes())),
        ("key without scheme", A::Raw(key.as_bytes().to_vec())),
        ("Token scheme", A::Raw(format!("Token {key}").into_bytes())),
        ("non-ASCII bytes", A::Raw(b"Bearer bk_\xff\xfe\xfd".to_vec())),
        ("non-ASCII admin-like", A::Raw(format!("Bearer {ADMIN}\u{e9}").into_bytes())),
        ("admin token minus a char", A::Raw(format!("Bearer {}", &ADMIN[..ADMIN.len() - 1]).into_bytes())),
        ("admin token plus a char", A::Raw(format!("Bearer {ADMIN}x").into_bytes())),
    ];
    for (method, path, body, agent_call) in targets.iter().cloned() {
        for (aname, auth) in &bad_auths {
            v.push(
                row(format!("{aname} auth on {method} {path}"), method, path.clone(), auth.clone(), body.clone())
                    .want(401, "invalid_credentials"),
            );
        }
        if agent_call {
            v.push(
                row(format!("admin token on {method} {path}"), method, path.clone(), A::Admin, body.clone())
                    .want(401, "invalid_credentials"),
            );
        } else if (path != "/v1/agents" || method != "POST") && !path.ends_with("/revoke") {
            v.push(
                row(format!("agent key on admin {method} {path}"), method, path.clone(), A::Victim, body.clone())
                    .want(401, "invalid_credentials"),
            );
        }
    }

    // --- Idempotency keys.
    for (name, value) in [
        ("256 chars", vec![b'k'; 256]),
        ("empty", Vec::new()),
        ("with a space", b"a b".to_vec()),
        ("with a tab", b"a\tb".to_vec()),
        ("non-ASCII", b"k\xffk".to_vec()),
    ] {
        for (path, body) in [
            ("/v1/spend".to_string(), good_spend.clone()),
            ("/v1/holds".to_string(), good_spend.clone()),
            (format!("/v1/holds/{hold}/capture"), r#"{"amount":"1"}"#.to_string()),
            (format!("/v1/holds/{hold}/release"), String::new()),
        ] {
            v.push(
                row(format!("Idempotency-Key {name} on {path}"), "POST", path, A::Victim, body)
                    .header("idempotency-key", value.clone()),
            );
        }
    }

    // --- Query strings.
    for q in [
        "limit=abc",
        "limit=-1",
        "limit=1.5",
        "limit=",
        "limit=0x10",
        "limit=%20",
        "limit=1e3",
        "bogus=1",
        "limit=1&limit=2",
        "after=x&after=y",
    ] {
        v.push(row(format!("GET /v1/agents?{q}"), "GET", format!("/v1/agents?{q}"), A::Admin, ""));
    }
    for q in ["limit=abc", "after=abc", "after=1.5", "bogus=1"] {
        v.push(row(format!("admin audit ?{q}"), "GET", format!("/v1/agents/victim/audit?{q}"), A::Admin, ""));
        v.push(row(format!("me audit ?{q}"), "GET", format!("/v1/me/audit?{q}"), A::Victim, ""));
    }
    for q in ["limit=999999", "limit=99999999999999999999999", "limit=0", "limit=1000", "limit=1001"] {
        v.push(row(format!("GET /v1/agents?{q} clamps"), "GET", format!("/v1/agents?{q}"), A::Admin, "").ok());
        v.push(
            row(format!("admin audit ?{q} clamps"), "GET", format!("/v1/agents/victim/audit?{q}"), A::Admin, "").ok(),
        );
        v.push(row(format!("me audit ?{q} clamps"), "GET", format!("/v1/me/audit?{q}"), A::Victim, "").ok());
        v.push(row(format!("blast radius ?{q} clamps"), "GET", format!("/v1/blast-radius?{q}"), A::Admin, "").ok());
    }
    for q in ["limit=abc", "limit=-1", "bogus=1"] {
        v.push(row(format!("blast radius ?{q}"), "GET", format!("/v1/blast-radius?{q}"), A::Admin, ""));
    }

    // --- Routes.
    v.push(row("unknown route", "GET", "/v2/agents", A::Admin, "").want(404, "not_found"));
    v.push(row("unknown agent", "GET", "/v1/agents/nobody", A::Admin, "").want(404, "not_found"));
    v.push(row("uppercase agent path", "GET", "/v1/agents/VICTIM", A::Admin, "").want(404, "not_found"));
    v.push(row("invalid UTF-8 in path", "GET", "/v1/agents/%FF", A::Admin, ""));
    v.push(
        row("unknown agent patch", "PATCH", "/v1/agents/nobody", A::Admin, r#"{"spending_cap":"1"}"#)
            .want(404, "not_found"),
    );
    v.push(row("unknown agent revoke", "POST", "/v1/agents/nobody/revoke", A::Admin, "").want(404, "not_found"));
    v.push(row("unknown agent rotate", "POST", "/v1/agents/nobody/keys", A::Admin, "").want(404, "not_found"));
    v.push(row("unknown agent audit", "GET", "/v1/agents/nobody/audit", A::Admin, "").want(404, "not_found"));
    v.push(
        row("unknown hold capture", "POST", "/v1/holds/hold_nope/capture", A::Victim, r#"{"amount":"1"}"#)
            .want(404, "not_found"),
    );
    v.push(row("unknown hold release", "POST", "/v1/holds/hold_nope/release", A::Victim, "").want(404, "not_found"));
    v.push(row("DELETE agents", "DELETE", "/v1/agents", A::Admin, "").want(405, "method_not_allowed"));
    v.push(row("DELETE agent", "DELETE", "/v1/agents/victim", A::Admin, "").want(405, "method_not_allowed"));
    v.push(row("GET spend", "GET", "/v1/spend", A::Victim, "").want(405, "method_not_allowed"));
    v.push(row("PUT spend", "PUT", "/v1/spend", A::Victim, good_spend.clone()).want(405, "method_not_allowed"));

    // --- Admin calls with broken bodies (last: a bug here would revoke or re-key the victim).
    for (name, body) in [
        ("unknown field", r#"{"why":"x"}"#),
        ("reason not a string", r#"{"reason":5}"#),
        ("JSON array", r#"[null]"#),
        ("JSON array of a reason", r#"["x"]"#),
    ] {
        v.push(row(format!("revoke {name}"), "POST", "/v1/agents/victim/revoke", A::Admin, body));
    }
    v.push(row(
        "revoke reason over 1000 chars",
        "POST",
        "/v1/agents/victim/revoke",
        A::Admin,
        format!(r#"{{"reason":"{}"}}"#, "r".repeat(1001)),
    ));
    for path in ["/v1/agents/victim/keys", "/v1/agents/victim/resume"] {
        for (name, body) in [("unknown field", r#"{"x":1}"#), ("empty JSON array", "[]"), ("broken JSON", "{")] {
            v.push(row(format!("{path} {name}"), "POST", path, A::Admin, body));
        }
    }
    v
}

/// What must not change across a hostile request.
async fn snapshot(s: &Srv) -> (Value, Vec<String>) {
    let victim = s.agent_view("victim").await;
    let list = s.get("/v1/agents?limit=1000", &Auth::Admin).await;
    list.expect(200, None);
    let handles =
        list.json["agents"].as_array().unwrap().iter().map(|a| a["handle"].as_str().unwrap().to_owned()).collect();
    (victim, handles)
}

#[tokio::test]
async fn hostile_table() {
    hostile_table_on(Srv::new().await).await;
}

/// The same table through the production connection path on a loopback socket: framing,
/// headers and bodies as hyper reads them off the wire.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_table_on_the_wire() {
    hostile_table_on(Srv::on_the_wire(Db::Sqlite).await).await;
}

/// And on PostgreSQL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_table_on_the_wire_postgres() {
    if !Db::Postgres.available() {
        return;
    }
    hostile_table_on(Srv::on_the_wire(Db::Postgres).await).await;
}

async fn hostile_table_on(s: Srv) {
    let (_, key) =
        s.create(json!({"handle": "victim", "scopes": ["a:b", "pay:x", "spawn:agents"], "spending_cap": "100"})).await;
    // An open hold to aim captures and releases at, and one spend so the counters are not zero.
    let hold = s.hold(&key, "pay:x", "1.00", Some("24h")).await;
    hold.expect(201, None);
    let hold_id = hold.json["id"].as_str().unwrap().to_owned();
    s.spend(&key, "pay:x", "2.50").await.expect(200, None);

    let mut wrong = key.clone().into_bytes();
    let last = wrong.len() - 1;
    wrong[last] = if wrong[last] == b'a' { b'b' } else { b'a' };
    let wrong = String::from_utf8(wrong).unwrap();
    assert!(ApiKey::parse(&wrong).is_none(), "the tampered key must fail its checksum");
    let unknown = ApiKey::generate(&mut rand::rng()).expose().to_owned();

    let before = snapshot(&s).await;
    assert_eq!(before.0["usage"]["window_spent"], "2.50");
    assert_eq!(before.0["usage"]["window_held"], "1.00");

    let table = rows(&hold_id, &key);
    let mut names = BTreeSet::new();
    for r in &table {
        assert!(names.insert(r.name.clone()), "duplicate row name {}", r.name);
    }
    // Exactly: a row lost (or added) by an edit shows here, and the count in the docs is this one.
    assert_eq!(table.len(), 1079, "the hostile table's size");
    eprintln!("{} hostile rows", table.len());
    for r in table {
        let auth = match &r.auth {
            A::None => Auth::None,
            A::Admin => Auth::Admin,
            A::Victim => Auth::key(&key),
            A::WrongChecksum => Auth::key(&wrong),
            A::Unknown => Auth::key(&unknown),
            A::Raw(b) => Auth::Raw(b.clone()),
        };
        let headers: Vec<(&str, &[u8])> = r.headers.iter().map(|(n, v)| (*n, v.as_slice())).collect();
        let resp = s.call(r.method, &r.path, &auth, &headers, r.body.clone()).await;
        assert_eq!(resp.status, r.status, "row {:?}: status; body {}", r.name, resp.text);
        if let Some(code) = r.code {
            assert_eq!(resp.code(), Some(code), "row {:?}: code; body {}", r.name, resp.text);
            if r.status == 413 {
                assert!(resp.text.len() < 1024, "a 413 must not echo the body");
            }
        }
        // Nothing was charged, held, created or changed, and the server still answers.
        let after = snapshot(&s).await;
        assert_eq!(after.0, before.0, "row {:?} changed the victim", r.name);
        assert_eq!(after.1, before.1, "row {:?} changed the set of agents", r.name);
        s.get("/v1/me", &Auth::key(&key)).await.expect(200, None);
        s.healthy().await;
    }
    // The victim still works normally after all that.
    s.spend(&key, "pay:x", "1").await.expect(200, None);
    let r = s.json("POST", &format!("/v1/holds/{hold_id}/capture"), &Auth::key(&key), json!({"amount": "1"})).await;
    r.expect(200, None);
    assert_eq!(s.usage("victim").await["window_spent"], "4.50");
}

/// Random JSON values, skewed towards the shapes the API reads.
fn arb_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<f64>().prop_filter("finite", |f| f.is_finite()).prop_map(Value::from),
        "[-+0-9.eE]{0,24}".prop_map(Value::from),
        "[a-z*:_.-]{0,12}".prop_map(Value::from),
        "[0-9]{1,3}[smhdw]".prop_map(Value::from),
        any::<String>().prop_map(Value::from),
    ];
    leaf.prop_recursive(4, 32, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::from),
            prop::collection::btree_map("[a-z_]{0,12}", inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

const FIELDS: &[&str] = &[
    "scope",
    "amount",
    "memo",
    "handle",
    "scopes",
    "spending_cap",
    "window",
    "per_tx_limit",
    "lifetime_cap",
    "rate_limit",
    "expires_in",
    "labels",
    "breaker",
];

/// Objects made of the API's own field names with random values (more of them get past the
/// first parse and reach the checks and the ledger).
fn arb_request() -> impl Strategy<Value = Vec<u8>> {
    let field = prop::sample::select(FIELDS);
    let obj = prop::collection::vec((field, arb_json()), 0..6).prop_map(|kv| {
        let mut s = String::from("{");
        for (i, (k, v)) in kv.iter().enumerate() {
            if i > 0 {
                s.push(',');
            }
            s.push_str(&format!("{}:{}", json!(k), v));
        }
        s.push('}');
        s.into_bytes()
    });
    // Near-valid values: mostly well-formed, sometimes one character off.
    let num = prop_oneof![
        3 => "[0-9]{1,4}(\\.[0-9]{1,7})?",
        1 => "[-+0-9.eE]{0,20}",
        1 => "[0-9]{12,15}",
    ];
    let scope = prop_oneof![
        3 => prop::sample::select(&["pay:x", "pay:y", "spawn:agents", "other:z", "*", "pay:*", "*:x"][..]).prop_map(str::to_owned),
        1 => "[a-z*:.]{0,8}",
    ];
    let spend = (scope.clone(), num.clone(), prop::option::of("[0-9]{1,2}[smhd]"), any::<bool>()).prop_map(
        |(sc, a, exp, as_number)| {
            let amount = if as_number && a.parse::<f64>().is_ok() { a.clone() } else { json!(a).to_string() };
            let exp = exp.map(|e| format!(r#","expires_in":"{e}""#)).unwrap_or_default();
            format!(r#"{{"scope":{},"amount":{amount}{exp}}}"#, json!(sc)).into_bytes()
        },
    );
    let create = (
        prop_oneof![3 => "[a-z0-9][a-z0-9._-]{0,10}", 1 => "[a-zA-Z0-9._ -]{0,70}"],
        prop::collection::vec(scope, 0..4),
        num.clone(),
        prop::option::of(num),
        prop::option::of(prop_oneof!["[0-9]{1,3}[smhd]", "[-0-9.smhdw]{0,6}"]),
    )
        .prop_map(|(h, sc, cap, per_tx, w)| {
            let mut v = json!({"handle": h, "scopes": sc, "spending_cap": cap});
            if let Some(p) = per_tx {
                v["per_tx_limit"] = json!(p);
            }
            if let Some(w) = w {
                v["window"] = json!(w);
            }
            v.to_string().into_bytes()
        });
    prop_oneof![
        2 => prop::collection::vec(any::<u8>(), 0..512),
        2 => arb_json().prop_map(|v| v.to_string().into_bytes()),
        3 => obj,
        3 => spend,
        3 => create,
    ]
}

#[test]
fn random_bodies_never_5xx() {
    random_bodies(false);
}

/// The same through the real listener: what hyper reads off a socket never makes a 5xx either.
#[test]
fn random_bodies_never_5xx_on_the_wire() {
    random_bodies(true);
}

fn random_bodies(wire: bool) {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let (s, key) = rt.block_on(async {
        let s = if wire { Srv::on_the_wire(Db::Sqlite).await } else { Srv::new().await };
        let (_, key) = s
            .create(json!({"handle": "fuzz", "scopes": ["pay:x", "spawn:agents"], "spending_cap": "1000000", "breaker": {"denials": 0}}))
            .await;
        (s, key)
    });
    let cases = std::env::var("PROPTEST_CASES").ok().and_then(|c| c.parse().ok()).unwrap_or(1000);
    let mut runner = TestRunner::new(Config { cases, failure_persistence: None, ..Config::default() });
    let targets = [
        ("/v1/spend", Auth::key(&key)),
        ("/v1/holds", Auth::key(&key)),
        ("/v1/agents", Auth::Admin),
        ("/v1/agents", Auth::key(&key)),
    ];
    let statuses = std::cell::RefCell::new(std::collections::BTreeMap::<u16, usize>::new());
    let result = runner.run(&(arb_request(), 0..targets.len()), |(body, t)| {
        let (path, auth) = &targets[t];
        rt.block_on(async {
            // `Srv::call` itself fails on a 5xx, a non-JSON answer or a malformed error body.
            let r = s.call("POST", path, auth, &[], body.clone()).await;
            if r.status >= 500 || !((200..300).contains(&r.status) || (400..500).contains(&r.status)) {
                return Err(TestCaseError::fail(format!("{path}: {} {}", r.status, r.text)));
            }
            *statuses.borrow_mut().entry(r.status).or_default() += 1;
            let h = s.get("/healthz", &Auth::None).await;
            if h.status != 200 {
                return Err(TestCaseError::fail("healthz stopped answering 200"));
            }
            Ok(())
        })
    });
    if let Err(e) = result {
        panic!("{e}");
    }
    // The generators reach both sides: some requests pass every check, most are refused.
    let statuses = statuses.into_inner();
    eprintln!("statuses: {statuses:?}");
    let ok: usize = statuses.iter().filter(|(s, _)| **s < 300).map(|(_, n)| n).sum();
    assert!(ok > 0 && statuses.contains_key(&400), "random inputs never reached both sides: {statuses:?}");
    // The ledger is still alive after it all: a plain spend still commits.
    rt.block_on(async {
        s.spend(&key, "pay:x", "1").await.expect(200, None);
    });
}
