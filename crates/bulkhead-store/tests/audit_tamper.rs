//! Tampering with a real SQLite store's `audit_events` behind Bulkhead's back: every change,
//! removal or reordering of a stored event must make `verify_audit` report `Broken`, naming the
//! first bad event. Each case works on a fresh store file, through a separate raw connection
//! (as an attacker with file access would), and is checked both through the serving `Store` and
//! through a second `Store` opened on the file the way the offline `audit verify` opens it.

mod common;

use bulkhead_store::{AuditKey, Caller, Command, Ledger, LedgerConfig, Patch, Store, VerifyReport};
use common::*;
use sha2::{Digest, Sha256};
use sqlx::sqlite::{SqliteConnectOptions, SqliteConnection};
use sqlx::{ConnectOptions, Connection, Row};

/// A store with a varied trail: creations, allowed and denied spends (with and without memo),
/// holds, a capture, a release, a patch, a revocation and a denial after it. Returns its length.
async fn trail() -> (Env, i64) {
    let e = Env::new(Db::Sqlite).await;
    let pk = e.admin_agent(spec("t-parent", &[PAY, "spawn:agents"], "50")).await;
    let ck = e.child_agent(&pk, spec("t-child", &[PAY], "10")).await;
    for i in 0..4 {
        e.advance(SEC);
        ok(&e.spend(&pk, &format!("1.{i}")).await, 200);
        let r = e
            .submit(Command::Spend {
                key: ck.clone(),
                scope: scope(PAY),
                amount: m("0.5"),
                memo: Some(format!("memo {i}")),
                idem: None,
            })
            .await;
        ok(&r, 200);
    }
    err(&e.spend(&ck, "11").await, 402, "per_tx_limit_exceeded");
    let h1 = e.hold_ok(&ck, "2", MIN).await;
    let h2 = e.hold_ok(&pk, "3", MIN).await;
    ok(&e.capture(&ck, &h1, "1.5").await, 200);
    ok(&e.release(&pk, &h2).await, 200);
    let patch =
        Patch { labels: Some(serde_json::Map::from_iter([("team".into(), "billing".into())])), ..Patch::default() };
    ok(&e.submit(Command::PatchAgent { handle: "t-parent".into(), patch }).await, 200);
    ok(&e.revoke(Caller::Admin, "t-child").await, 200);
    err(&e.spend(&ck, "1").await, 401, "credential_revoked");
    let n = e.intact().await;
    assert!(n >= 15, "a trail long enough to tamper with in the middle: {n}");
    (e, n)
}

async fn raw(e: &Env) -> SqliteConnection {
    SqliteConnectOptions::new().filename(e.sqlite_file()).connect().await.expect("raw connection to the store file")
}

/// Runs tampering SQL; each statement must change at least one row.
async fn tamper(e: &Env, statements: &[&str]) {
    let mut conn = raw(e).await;
    let mut tx = conn.begin().await.unwrap();
    for sql in statements {
        let done = sqlx::query(sqlx::AssertSqlSafe(sql.to_string())).execute(&mut *tx).await.unwrap();
        assert!(sql.starts_with("CREATE") || done.rows_affected() >= 1, "the tampering changed nothing: {sql}");
    }
    tx.commit().await.unwrap();
    conn.close().await.unwrap();
}

/// Verifies through the serving store and through a second store opened like the offline
/// command does; both must agree that the chain breaks at `seq`.
async fn assert_broken_at(e: &Env, seq: i64, what: &str) {
    let report = e.store.verify_audit(|_| {}).await.unwrap();
    match &report {
        VerifyReport::Broken { seq: got, .. } => assert_eq!(*got, seq, "{what}: {report:?}"),
        other => panic!("{what}: tampering went unnoticed ({other:?})"),
    }
    let dir = e.sqlite_file().parent().unwrap().to_owned();
    let offline = Store::open_existing_dir(&dir).await.unwrap();
    assert_eq!(offline.verify_audit(|_| {}).await.unwrap(), report, "{what}: offline verify agrees");
    offline.close().await;
}

#[tokio::test]
async fn untouched_trail_is_intact() {
    let (e, n) = trail().await;
    let dir = e.sqlite_file().parent().unwrap().to_owned();
    // Offline verify works while the ledger is still running.
    let offline = Store::open_existing_dir(&dir).await.unwrap();
    assert_eq!(offline.verify_audit(|_| {}).await.unwrap(), VerifyReport::Intact { events: n, unkeyed: n });
    let ev = offline.audit_page(None, 0, 1000).await.unwrap();
    assert_eq!(ev.len() as i64, n);
    for w in ev.windows(2) {
        assert_eq!(w[1].prev_hash, w[0].hash, "each event links to the one before");
        assert_eq!(w[1].seq, w[0].seq + 1);
    }
    offline.close().await;
    e.finish().await;
}

#[tokio::test]
async fn changing_the_amount_of_one_event_breaks_the_chain_there() {
    let (e, n) = trail().await;
    let mut conn = raw(&e).await;
    let k: i64 = sqlx::query_scalar(
        "SELECT seq FROM audit_events WHERE action = 'spend' AND amount IS NOT NULL AND seq > $1 ORDER BY seq LIMIT 1",
    )
    .bind(n / 3)
    .fetch_one(&mut conn)
    .await
    .unwrap();
    conn.close().await.unwrap();
    tamper(&e, &[&format!("UPDATE audit_events SET amount = amount + 1 WHERE seq = {k}")]).await;
    assert_broken_at(&e, k, "amount + 1 micro").await;
    e.finish().await;
}

#[tokio::test]
async fn changing_any_field_of_any_event_is_detected() {
    // Every stored column, changed on a middle event, on the first one and on the last one.
    let changes = [
        "at = at + 1",
        "agent = agent || 'x'",
        "action = action || 'x'",
        "outcome = CASE outcome WHEN 'allowed' THEN 'denied' ELSE 'allowed' END",
        "reason = COALESCE(reason || 'x', 'x')",
        "scope = COALESCE(scope || 'x', 'x')",
        "amount = COALESCE(amount + 1, 0)",
        "ref = COALESCE(ref || 'x', 'x')",
        "detail = COALESCE(detail || ' ', '{}')",
        "prev_hash = '1111111111111111111111111111111111111111111111111111111111111111'",
        "hash = '2222222222222222222222222222222222222222222222222222222222222222'",
        // NULLing a value that was set.
        "reason = NULL, scope = NULL, amount = NULL, ref = NULL, detail = NULL",
    ];
    for change in changes {
        for which in ["first", "middle", "last"] {
            let (e, n) = trail().await;
            let k = match which {
                "first" => 1,
                "middle" => n / 2,
                _ => n,
            };
            let mut conn = raw(&e).await;
            let set: i64 = sqlx::query_scalar(
                "SELECT (reason IS NOT NULL) + (scope IS NOT NULL) + (amount IS NOT NULL) + (ref IS NOT NULL) \
                 + (detail IS NOT NULL) FROM audit_events WHERE seq = $1",
            )
            .bind(k)
            .fetch_one(&mut conn)
            .await
            .unwrap();
            conn.close().await.unwrap();
            if change.ends_with("detail = NULL") && set == 0 {
                // Nothing to NULL on this event.
                continue;
            }
            tamper(&e, &[&format!("UPDATE audit_events SET {change} WHERE seq = {k}")]).await;
            assert_broken_at(&e, k, &format!("{change} on event {k} ({which})")).await;
            e.finish().await;
        }
    }
}

#[tokio::test]
async fn deleting_a_middle_event_is_detected() {
    let (e, n) = trail().await;
    let k = n / 2;
    tamper(&e, &[&format!("DELETE FROM audit_events WHERE seq = {k}")]).await;
    assert_broken_at(&e, k, "deleted middle event").await;
    e.finish().await;
}

#[tokio::test]
async fn deleting_the_first_event_is_detected() {
    let (e, _) = trail().await;
    tamper(&e, &["DELETE FROM audit_events WHERE seq = 1"]).await;
    assert_broken_at(&e, 1, "deleted first event").await;
    e.finish().await;
}

#[tokio::test]
async fn deleting_the_last_events_is_detected() {
    let (e, n) = trail().await;
    tamper(&e, &[&format!("DELETE FROM audit_events WHERE seq = {n}")]).await;
    assert_broken_at(&e, n, "deleted last event").await;
    tamper(&e, &[&format!("DELETE FROM audit_events WHERE seq >= {}", n - 3)]).await;
    assert_broken_at(&e, n - 3, "deleted the last four events").await;
    tamper(&e, &["DELETE FROM audit_events"]).await;
    assert_broken_at(&e, 1, "deleted every event").await;
    e.finish().await;
}

#[tokio::test]
async fn swapping_two_events_is_detected() {
    // Swap the contents of two rows (each keeps its seq).
    let (e, n) = trail().await;
    let (a, b) = (n / 3, 2 * n / 3);
    let cols = "at, agent, action, outcome, reason, scope, amount, ref, detail, prev_hash, hash";
    tamper(
        &e,
        &[
            &format!("CREATE TEMP TABLE swap AS SELECT * FROM audit_events WHERE seq IN ({a}, {b})"),
            &format!(
                "UPDATE audit_events SET ({cols}) = (SELECT {cols} FROM swap \
             WHERE swap.seq = CASE audit_events.seq WHEN {a} THEN {b} ELSE {a} END) WHERE seq IN ({a}, {b})"
            ),
        ],
    )
    .await;
    assert_broken_at(&e, a, "two events' contents swapped").await;
    e.finish().await;

    // Swap two adjacent events by renumbering them (a reordering).
    let (e, n) = trail().await;
    let a = n / 2;
    tamper(
        &e,
        &[
            &format!("UPDATE audit_events SET seq = -1 WHERE seq = {a}"),
            &format!("UPDATE audit_events SET seq = {a} WHERE seq = {}", a + 1),
            &format!("UPDATE audit_events SET seq = {} WHERE seq = -1", a + 1),
        ],
    )
    .await;
    assert_broken_at(&e, a, "two adjacent events reordered").await;
    e.finish().await;
}

/// The hash the store computes for an event (SHA-256 of a JSON array of every field and the
/// previous hash), recomputed here as a forger would.
fn forge_hash(row: &sqlx::sqlite::SqliteRow) -> String {
    let canonical = serde_json::json!([
        row.get::<i64, _>("seq"),
        row.get::<i64, _>("at"),
        row.get::<String, _>("agent"),
        row.get::<String, _>("action"),
        row.get::<String, _>("outcome"),
        row.get::<Option<String>, _>("reason"),
        row.get::<Option<String>, _>("scope"),
        row.get::<Option<i64>, _>("amount"),
        row.get::<Option<String>, _>("ref"),
        row.get::<Option<String>, _>("detail"),
        row.get::<String, _>("prev_hash"),
    ]);
    hex::encode(Sha256::digest(canonical.to_string().as_bytes()))
}

async fn rehash(e: &Env, seq: i64) {
    let mut conn = raw(e).await;
    let row = sqlx::query("SELECT * FROM audit_events WHERE seq = $1").bind(seq).fetch_one(&mut conn).await.unwrap();
    let forged = forge_hash(&row);
    sqlx::query("UPDATE audit_events SET hash = $1 WHERE seq = $2")
        .bind(forged)
        .bind(seq)
        .execute(&mut conn)
        .await
        .unwrap();
    conn.close().await.unwrap();
}

#[tokio::test]
async fn a_forger_who_rehashes_the_changed_event_is_still_caught() {
    let (e, n) = trail().await;
    // The forger's hash function is the store's: it reproduces an untouched event's hash.
    let mut conn = raw(&e).await;
    let row = sqlx::query("SELECT * FROM audit_events WHERE seq = 3").fetch_one(&mut conn).await.unwrap();
    assert_eq!(forge_hash(&row), row.get::<String, _>("hash"), "the test's copy of the hash matches the store's");
    conn.close().await.unwrap();

    // A middle event changed and rehashed: the next event's link no longer matches.
    let k = n / 2;
    tamper(&e, &[&format!("UPDATE audit_events SET amount = COALESCE(amount, 0) + 1000000 WHERE seq = {k}")]).await;
    rehash(&e, k).await;
    assert_broken_at(&e, k + 1, "rehashed middle event").await;
    e.finish().await;

    // The last event changed and rehashed: only the chain head knows; the last event is named.
    let (e, n) = trail().await;
    tamper(&e, &[&format!("UPDATE audit_events SET agent = 'someone-else' WHERE seq = {n}")]).await;
    rehash(&e, n).await;
    assert_broken_at(&e, n, "rehashed last event").await;
    e.finish().await;

    // A forged event appended after the last one, properly linked and hashed.
    let (e, n) = trail().await;
    tamper(&e, &[&format!(
        "INSERT INTO audit_events (seq, at, agent, action, outcome, reason, scope, amount, ref, detail, prev_hash, hash) \
         SELECT seq + 1, at, agent, 'spend', 'allowed', NULL, 'payments:write', 1, NULL, NULL, hash, '' \
         FROM audit_events WHERE seq = {n}"
    )])
    .await;
    rehash(&e, n + 1).await;
    assert_broken_at(&e, n + 1, "forged event appended").await;
    e.finish().await;
}

#[tokio::test]
async fn tampering_beyond_the_first_page_is_found() {
    // More events than one page of the verifier (5 000), written by concurrent spends.
    let e = Env::new(Db::Sqlite).await;
    let k = e.admin_agent(spec("many", &[PAY], "1000000")).await;
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..5_200 {
        let ledger = e.ledger.clone();
        let key = k.clone();
        set.spawn(async move {
            submit_to(&ledger, Command::Spend { key, scope: scope(PAY), amount: m("0.01"), memo: None, idem: None })
                .await
                .expect("the ledger answered")
                .status
        });
    }
    while let Some(status) = set.join_next().await {
        assert_eq!(status.unwrap(), 200);
    }
    let n = e.intact().await;
    assert_eq!(n, 5_201);
    assert_eq!(e.agent("many").await.usage.window_spent, m("52"));
    let mut pages = Vec::new();
    assert!(matches!(e.store.verify_audit(|p| pages.push(p)).await.unwrap(), VerifyReport::Intact { .. }));
    assert!(pages.len() >= 2, "the verifier paged: {pages:?}");
    tamper(&e, &["UPDATE audit_events SET at = at + 1 WHERE seq = 5123"]).await;
    assert_broken_at(&e, 5_123, "a change on the second page").await;
    tamper(&e, &["DELETE FROM audit_events WHERE seq = 5000"]).await;
    assert_broken_at(&e, 5_000, "a deletion at the page boundary").await;
    e.finish().await;
}

/// A few decisions through a ledger on `store` (an agent and two spends); returns how many
/// events they wrote.
async fn some_decisions(store: Store, handle: &str) -> i64 {
    let cfg = LedgerConfig { seed: Some(bulkhead_testkit::seed()), ..LedgerConfig::default() };
    let (ledger, writer) = Ledger::start(store.clone(), bulkhead_testkit::manual_clock(), cfg);
    let key = new_key();
    let r = submit_to(
        &ledger,
        Command::CreateAgent { caller: Caller::Admin, spec: spec(handle, &[PAY], "10"), key_hash: key.clone() },
    )
    .await
    .unwrap();
    ok(&r, 201);
    for _ in 0..2 {
        let spend = Command::Spend { key: key.clone(), scope: scope(PAY), amount: m("1"), memo: None, idem: None };
        ok(&submit_to(&ledger, spend).await.unwrap(), 200);
    }
    drop(ledger);
    writer.await.unwrap();
    store.close().await;
    3
}

/// Hardening finding 9 (contract §12): with an audit key kept outside the database, write access
/// to the database alone no longer lets a forger rewrite history and recompute the chain.
/// Events written before the key still verify by their plain hash.
#[tokio::test]
async fn a_keyed_chain_cannot_be_rewritten_without_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bulkhead.db");
    let url = format!("sqlite://{}?mode=rwc", file.display());
    let before = some_decisions(Store::open(&url).await.unwrap(), "before-key").await;
    let key = AuditKey::generate().to_hex();
    let keyed = || async { Store::open(&url).await.unwrap().with_audit_key(AuditKey::from_hex(&key).unwrap()) };
    let after = some_decisions(keyed().await, "after-key").await;
    let n = before + after;

    let s = keyed().await;
    assert_eq!(s.verify_audit(|_| {}).await.unwrap(), VerifyReport::Intact { events: n, unkeyed: before });
    let ev = s.audit_page(None, 0, 100).await.unwrap();
    assert!(ev[..before as usize].iter().all(|e| e.hash.len() == 64), "the old events keep their plain hash");
    assert!(ev[before as usize..].iter().all(|e| e.hash.starts_with("k1:")), "new events are keyed");
    s.close().await;
    let unkeyed = Store::open(&url).await.unwrap();
    assert_eq!(unkeyed.verify_audit(|_| {}).await.unwrap(), VerifyReport::KeyNeeded { seq: before + 1 });
    unkeyed.close().await;
    let other = Store::open(&url).await.unwrap().with_audit_key(AuditKey::generate());
    assert!(matches!(other.verify_audit(|_| {}).await.unwrap(), VerifyReport::Broken { seq, .. } if seq == before + 1));
    other.close().await;

    // A forger changes a keyed event and recomputes the rest of the chain, links and head
    // included, the only way they can: with plain hashes.
    let forged_from = before + 2;
    let mut conn = SqliteConnectOptions::new().filename(&file).connect().await.unwrap();
    sqlx::query("UPDATE audit_events SET amount = 1 WHERE seq = $1")
        .bind(forged_from)
        .execute(&mut conn)
        .await
        .unwrap();
    let mut prev: String = sqlx::query_scalar("SELECT hash FROM audit_events WHERE seq = $1")
        .bind(forged_from - 1)
        .fetch_one(&mut conn)
        .await
        .unwrap();
    for seq in forged_from..=n {
        sqlx::query("UPDATE audit_events SET prev_hash = $1 WHERE seq = $2")
            .bind(&prev)
            .bind(seq)
            .execute(&mut conn)
            .await
            .unwrap();
        let row =
            sqlx::query("SELECT * FROM audit_events WHERE seq = $1").bind(seq).fetch_one(&mut conn).await.unwrap();
        prev = forge_hash(&row);
        sqlx::query("UPDATE audit_events SET hash = $1 WHERE seq = $2")
            .bind(&prev)
            .bind(seq)
            .execute(&mut conn)
            .await
            .unwrap();
    }
    sqlx::query("UPDATE audit_head SET hash = $1 WHERE id = 1").bind(&prev).execute(&mut conn).await.unwrap();
    conn.close().await.unwrap();
    let s = keyed().await;
    match s.verify_audit(|_| {}).await.unwrap() {
        VerifyReport::Broken { seq, problem } => {
            assert_eq!(seq, forged_from, "{problem}");
            assert!(problem.contains("plain hash after keyed"), "{problem}");
        }
        other => panic!("a rewritten keyed chain went unnoticed: {other:?}"),
    }
    s.close().await;
}
