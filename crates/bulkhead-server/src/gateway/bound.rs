//! The worst case of a token-priced call, bounded before it leaves (contract §12).
//!
//! A call's input is at most one token per byte of its body, priced at the dearest input rate
//! (cache writes included); what the hold has left after that buys the output tokens, and the
//! request's output limit (`max_completion_tokens`, `max_tokens` or `max_output_tokens`, by API)
//! is set, or lowered, to that many. So a call's metered cost can never exceed its hold, and a
//! call whose input alone could is refused before it leaves.
//!
//! Pure: bytes in, bytes out.

use bulkhead_core::Micros;
use bytes::{Bytes, BytesMut};
use serde_json::Value;

use super::config::{Dialect, TokenPrices};

/// The largest output limit written into a request (APIs take a 32-bit count).
const OUTPUT_TOKENS_MAX: u64 = i32::MAX as u64;

/// Why a call cannot be bounded within its hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unbounded {
    /// Its input alone could cost the whole hold (`bytes` of body, up to that many tokens).
    InputTooDear { bytes: usize },
}

/// The output-limit fields of the API at `path`, the first one the one set when none is sent.
fn output_fields(dialect: Dialect, path: &str) -> &'static [&'static str] {
    let path = path.trim_end_matches('/');
    match dialect {
        Dialect::OpenAi if path.ends_with("chat/completions") => &["max_completion_tokens", "max_tokens"],
        Dialect::OpenAi if path.ends_with("completions") => &["max_tokens"],
        Dialect::OpenAi if path.ends_with("responses") => &["max_output_tokens"],
        Dialect::Anthropic if path.ends_with("messages") => &["max_tokens"],
        _ => &[],
    }
}

/// The most output tokens `room` pays for at `price` per million: the largest `n` whose cost,
/// rounded up as the meter rounds it, is at most `room`. `None`: output is free.
pub fn output_allowance(room: Micros, price: Micros) -> Option<u64> {
    if price.is_zero() {
        return None;
    }
    let n = i128::from(room.micros()) * 1_000_000 / i128::from(price.micros());
    Some(u64::try_from(n).unwrap_or(0).min(OUTPUT_TOKENS_MAX))
}

/// Bounds a JSON request body to `hold` (see the module). Returns the body to send: as it came
/// when it already asks for no more than the hold affords (or is not a JSON object, or the API
/// has no output limit), else with its output limit set or lowered.
pub fn bound(
    body: Bytes,
    path: &str,
    dialect: Dialect,
    prices: &TokenPrices,
    hold: Micros,
) -> Result<Bytes, Unbounded> {
    let input_price = prices.input.max(prices.cache_write).max(prices.cache_read);
    let input_max = Micros::per_million_ceil(body.len() as u64, input_price);
    let room = match input_max.and_then(|i| hold.checked_sub(i)) {
        Some(r) if !r.is_zero() || prices.output.is_zero() => r,
        _ => return Err(Unbounded::InputTooDear { bytes: body.len() }),
    };
    let fields = output_fields(dialect, path);
    let Some(allowed) = output_allowance(room, prices.output) else {
        return Ok(body);
    };
    if fields.is_empty() {
        return Ok(body);
    }
    if allowed == 0 {
        return Err(Unbounded::InputTooDear { bytes: body.len() });
    }
    let Ok(Value::Object(mut m)) = serde_json::from_slice::<Value>(&body) else {
        // Not an object: the upstream refuses it without doing any work.
        return Ok(body);
    };
    let present: Vec<&str> = fields.iter().copied().filter(|f| m.contains_key(*f)).collect();
    if present.is_empty() {
        // Insert the limit right after the opening brace: every other byte stays as sent.
        let Some(open) = body.iter().position(|&b| b == b'{') else {
            return Ok(body);
        };
        let field = format!("\"{}\":{allowed},", fields[0]);
        let mut out = BytesMut::with_capacity(body.len() + field.len());
        out.extend_from_slice(&body[..=open]);
        out.extend_from_slice(field.as_bytes());
        out.extend_from_slice(&body[open + 1..]);
        return Ok(out.freeze());
    }
    for f in present {
        // A limit that is not a whole number is the upstream's to refuse; bound it all the same.
        let asked = m.get(f).and_then(Value::as_u64);
        if asked.is_none_or(|a| a > allowed) {
            m.insert(f.to_owned(), Value::from(allowed));
        }
    }
    // Written afresh even when nothing was lowered: a body that names a limit twice (or in an
    // escaped spelling) must reach the upstream as the one object read here, whatever parser
    // the upstream uses.
    match serde_json::to_vec(&Value::Object(m)) {
        Ok(v) => Ok(Bytes::from(v)),
        Err(_) => Err(Unbounded::InputTooDear { bytes: body.len() }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(s: &str) -> Micros {
        Micros::parse(s).unwrap()
    }

    fn openai() -> TokenPrices {
        TokenPrices { input: m("2.50"), output: m("10.00"), cache_write: m("2.50"), cache_read: m("2.50") }
    }

    fn json(b: &Bytes) -> Value {
        serde_json::from_slice(b).unwrap()
    }

    #[test]
    fn allowance_rounds_as_the_meter_does() {
        // 10.00 per million: 0.00001 a token. 0.50 buys 50,000 tokens, not one more.
        let n = output_allowance(m("0.50"), m("10")).unwrap();
        assert_eq!(n, 50_000);
        assert!(Micros::per_million_ceil(n, m("10")).unwrap() <= m("0.50"));
        assert!(Micros::per_million_ceil(n + 1, m("10")).unwrap() > m("0.50"));
        // A price that does not divide evenly: the cost of the allowance, rounded up, still fits.
        let n = output_allowance(m("0.000007"), m("3.33")).unwrap();
        assert!(Micros::per_million_ceil(n, m("3.33")).unwrap() <= m("0.000007"));
        assert!(Micros::per_million_ceil(n + 1, m("3.33")).unwrap() > m("0.000007"));
        assert_eq!(output_allowance(m("1"), Micros::ZERO), None);
    }

    /// Hardening finding 3: an answer reporting ~$1,250 of usage was charged 0.50. The request
    /// now asks for no more output than the hold pays for, whatever the agent asked.
    #[test]
    fn the_output_limit_is_set_or_lowered_to_what_the_hold_affords() {
        let body = Bytes::from_static(br#"{"model":"m","messages":[{"role":"user","content":"hi"}]}"#);
        let input = Micros::per_million_ceil(body.len() as u64, m("2.50")).unwrap();
        let allowed = output_allowance(m("0.50").checked_sub(input).unwrap(), m("10")).unwrap();
        let out = bound(body.clone(), "v1/chat/completions", Dialect::OpenAi, &openai(), m("0.50")).unwrap();
        assert_eq!(json(&out)["max_completion_tokens"], allowed);
        assert!(out.ends_with(&body[1..]), "the rest of the body is as sent");
        let worst = Micros::per_million_ceil(body.len() as u64, m("2.50"))
            .unwrap()
            .checked_add(Micros::per_million_ceil(allowed, m("10")).unwrap())
            .unwrap();
        assert!(worst <= m("0.50"), "input and output at their worst fit the hold: {worst}");

        let asked_more = Bytes::from_static(br#"{"model":"m","max_tokens":125000000,"messages":[]}"#);
        let out = bound(asked_more, "/v1/chat/completions", Dialect::OpenAi, &openai(), m("0.50")).unwrap();
        assert!(json(&out)["max_tokens"].as_u64().unwrap() < 50_000);
        assert!(json(&out).get("max_completion_tokens").is_none(), "the field the agent used is the one lowered");

        let asked_less = Bytes::from_static(br#"{"model":"m","max_completion_tokens":100}"#);
        let out = bound(asked_less.clone(), "v1/chat/completions", Dialect::OpenAi, &openai(), m("0.50")).unwrap();
        assert_eq!(out, asked_less, "a request within the hold goes as sent");
        // A limit named twice: an upstream that reads the first would see ten million.
        let twice = Bytes::from_static(br#"{"model":"m","max_tokens":10000000,"max_tokens":5}"#);
        let out = bound(twice, "v1/chat/completions", Dialect::OpenAi, &openai(), m("0.50")).unwrap();
        assert_eq!(&out[..], br#"{"model":"m","max_tokens":5}"#, "sent as the one object read");
    }

    #[test]
    fn each_api_has_its_field() {
        let body = || Bytes::from_static(br#"{"model":"m","input":"x"}"#);
        let out = bound(body(), "v1/responses", Dialect::OpenAi, &openai(), m("0.50")).unwrap();
        assert!(json(&out)["max_output_tokens"].is_u64());
        let out = bound(body(), "v1/completions", Dialect::OpenAi, &openai(), m("0.50")).unwrap();
        assert!(json(&out)["max_tokens"].is_u64());
        let anthropic = TokenPrices { input: m("3"), output: m("15"), cache_write: m("3.75"), cache_read: m("0.30") };
        let out = bound(
            Bytes::from_static(br#"{"model":"m","max_tokens":1000000,"messages":[]}"#),
            "v1/messages",
            Dialect::Anthropic,
            &anthropic,
            m("1.00"),
        )
        .unwrap();
        assert!(json(&out)["max_tokens"].as_u64().unwrap() < 66_667);
        // Embeddings have no output: the body goes as sent, its input bounded all the same.
        assert_eq!(bound(body(), "v1/embeddings", Dialect::OpenAi, &openai(), m("0.50")).unwrap(), body());
    }

    #[test]
    fn an_input_that_could_cost_the_whole_hold_is_refused() {
        // 2.50 per million tokens, at most one token a byte: 0.01 covers 4,000 bytes of input.
        let big = Bytes::from(format!(r#"{{"model":"m","input":"{}"}}"#, "x".repeat(4_000)));
        let len = big.len();
        assert_eq!(
            bound(big.clone(), "v1/responses", Dialect::OpenAi, &openai(), m("0.01")),
            Err(Unbounded::InputTooDear { bytes: len })
        );
        assert_eq!(
            bound(big, "v1/embeddings", Dialect::OpenAi, &openai(), m("0.01")),
            Err(Unbounded::InputTooDear { bytes: len })
        );
    }

    fn json_body() -> impl proptest::strategy::Strategy<Value = Vec<u8>> {
        use proptest::prelude::*;
        let limit = prop_oneof![
            Just(None),
            any::<u64>().prop_map(|n| Some(Value::from(n))),
            any::<i64>().prop_map(|n| Some(Value::from(n))),
            "[a-z]{0,5}".prop_map(|t| Some(Value::from(t))),
            Just(Some(Value::Null)),
        ];
        let field = proptest::sample::select(vec!["max_tokens", "max_completion_tokens", "max_output_tokens", "x"]);
        (limit, field, "[ -~]{0,3000}", any::<bool>()).prop_map(|(limit, field, text, stream)| {
            let mut m = serde_json::Map::new();
            m.insert("model".into(), Value::from("m"));
            if let Some(l) = limit {
                m.insert(field.to_owned(), l);
            }
            m.insert("messages".into(), serde_json::json!([{"role": "user", "content": text}]));
            m.insert("stream".into(), Value::from(stream));
            serde_json::to_vec(&Value::Object(m)).unwrap()
        })
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(512))]

        /// Any JSON a gateway reads: the bound never panics, and whatever it sends can never cost
        /// more than the hold (input at one token a byte, output at the limit it set), or it
        /// refuses to send.
        #[test]
        fn whatever_is_sent_fits_the_hold(
            body in proptest::prop_oneof![json_body(), proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512)],
            hold_micros in 1i64..5_000_000,
            path in proptest::sample::select(vec!["v1/chat/completions", "v1/completions", "v1/responses", "v1/messages", "v1/embeddings", "x"]),
            anthropic in proptest::prelude::any::<bool>(),
        ) {
            let (dialect, prices) = if anthropic {
                (Dialect::Anthropic, TokenPrices { input: m("3"), output: m("15"), cache_write: m("3.75"), cache_read: m("0.30") })
            } else {
                (Dialect::OpenAi, openai())
            };
            let hold = Micros::from_micros(hold_micros).unwrap();
            match bound(Bytes::from(body.clone()), path, dialect, &prices, hold) {
                Err(Unbounded::InputTooDear { bytes }) => {
                    proptest::prop_assert_eq!(bytes, body.len());
                }
                Ok(out) => {
                    let dearest = prices.input.max(prices.cache_write).max(prices.cache_read);
                    let input = Micros::per_million_ceil(body.len() as u64, dearest).unwrap();
                    proptest::prop_assert!(input <= hold, "an input that could cost the hold was sent");
                    let fields = output_fields(dialect, path);
                    if let (Ok(Value::Object(sent)), false) = (serde_json::from_slice::<Value>(&out), fields.is_empty()) {
                        // What the upstream is told to stop at, in the field it reads first.
                        let limit = fields.iter().filter_map(|f| sent.get(*f)).filter_map(Value::as_u64).min();
                        proptest::prop_assert!(limit.is_some(), "a bounded API always gets a limit: {:?}", sent);
                        let original_input = Micros::per_million_ceil(body.len() as u64, prices.input.max(prices.cache_write).max(prices.cache_read)).unwrap();
                        let output = Micros::per_million_ceil(limit.unwrap(), prices.output).unwrap();
                        proptest::prop_assert!(original_input.checked_add(output).unwrap() <= hold);
                    }
                }
            }
        }
    }
}
