//! Reading the cost of a call from its answer, as the bytes go by.
//!
//! A [`Meter`] sees every chunk of the upstream's body on its way to the agent. For an SSE
//! stream it reads each `data:` line that mentions usage; for a plain answer it keeps a copy of
//! the body (up to [`JSON_BYTES_MAX`]) and reads `usage` at the end. It never delays a chunk,
//! except when it strips the usage-only chunk that the gateway asked OpenAI for: then it passes
//! on whole SSE events (a chunk is held only until its event's blank line arrives).
//!
//! Pure and synchronous: no I/O, no clock. Anything it cannot read leaves the usage unknown,
//! and an unknown usage is charged as the whole hold by the caller.

use bulkhead_core::Micros;
use bytes::{Bytes, BytesMut};
use serde_json::Value;

use super::config::{Dialect, TokenPrices};

/// The most bytes of a non-streamed answer kept for reading its usage.
pub const JSON_BYTES_MAX: usize = 8 * 1024 * 1024;
/// The longest SSE line read; a longer one is skipped (its usage, if any, is then unknown).
pub const LINE_BYTES_MAX: usize = 1024 * 1024;

/// Token counts of one call.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    pub input: u64,
    pub output: u64,
    pub cache_write: u64,
    pub cache_read: u64,
}

impl TokenPrices {
    /// The cost of `u`: each kind of token priced per million and rounded up to the micro-unit,
    /// then summed. `None` when it overflows (the caller charges the whole hold).
    pub fn cost(&self, u: &Usage) -> Option<Micros> {
        let parts = [
            Micros::per_million_ceil(u.input, self.input)?,
            Micros::per_million_ceil(u.output, self.output)?,
            Micros::per_million_ceil(u.cache_write, self.cache_write)?,
            Micros::per_million_ceil(u.cache_read, self.cache_read)?,
        ];
        parts.iter().try_fold(Micros::ZERO, |acc, p| acc.checked_add(*p))
    }
}

fn count(v: &Value, field: &str) -> Option<Option<u64>> {
    match v.get(field) {
        None | Some(Value::Null) => Some(None),
        Some(n) => n.as_u64().map(Some),
    }
}

/// Reads a usage object: `prompt_tokens`/`completion_tokens` (OpenAI chat), `input_tokens`/
/// `output_tokens` (Anthropic, OpenAI responses), `total_tokens` when there is no output count
/// (embeddings), and Anthropic's cache counts. `None` unless the counts are whole numbers.
pub fn usage_object(v: &Value) -> Option<Usage> {
    if !v.is_object() {
        return None;
    }
    let input = count(v, "prompt_tokens")?.or(count(v, "input_tokens")?)?;
    let output = match count(v, "completion_tokens")?.or(count(v, "output_tokens")?) {
        Some(o) => o,
        None => count(v, "total_tokens")??.checked_sub(input)?,
    };
    Some(Usage {
        input,
        output,
        cache_write: count(v, "cache_creation_input_tokens")?.unwrap_or(0),
        cache_read: count(v, "cache_read_input_tokens")?.unwrap_or(0),
    })
}

/// Is this OpenAI stream chunk the usage-only one (`"choices": []` with a usage object)?
pub fn is_usage_only_chunk(v: &Value) -> bool {
    v.get("choices").and_then(Value::as_array).is_some_and(Vec::is_empty)
        && v.get("usage").is_some_and(Value::is_object)
}

/// The usage of a streaming Anthropic message: `message_start` carries the input counts,
/// every `message_delta` the running output count (and, on newer APIs, input counts too).
#[derive(Default)]
struct AnthropicStream {
    start: Option<Value>,
    delta_seen: bool,
    merged: serde_json::Map<String, Value>,
}

/// Follows the usage of one answer and (optionally) strips the usage-only SSE chunk.
pub struct Meter {
    dialect: Dialect,
    sse: bool,
    strip: bool,
    /// SSE: the unfinished line.
    line: Vec<u8>,
    line_too_long: bool,
    /// SSE with `strip`: the raw bytes of the unfinished event and whether it is dropped.
    event: BytesMut,
    drop_event: bool,
    /// Plain answer: its bytes so far.
    body: Vec<u8>,
    body_too_long: bool,
    usage: Option<Usage>,
    anthropic: AnthropicStream,
}

impl Meter {
    /// `sse`: the answer is `text/event-stream`; `strip`: remove OpenAI's usage-only chunk.
    pub fn new(dialect: Dialect, sse: bool, strip: bool) -> Meter {
        Meter {
            dialect,
            sse,
            strip: strip && sse,
            line: Vec::new(),
            line_too_long: false,
            event: BytesMut::new(),
            drop_event: false,
            body: Vec::new(),
            body_too_long: false,
            usage: None,
            anthropic: AnthropicStream::default(),
        }
    }

    /// The usage read so far (for a stream: the latest complete one).
    pub fn usage(&self) -> Option<Usage> {
        self.usage
    }

    /// Takes one chunk of the answer; returns the bytes to pass on to the agent now.
    pub fn feed(&mut self, chunk: Bytes) -> Bytes {
        if !self.sse {
            if !self.body_too_long {
                if self.body.len() + chunk.len() > JSON_BYTES_MAX {
                    self.body_too_long = true;
                    self.body = Vec::new();
                } else {
                    self.body.extend_from_slice(&chunk);
                }
            }
            return chunk;
        }
        let mut out = BytesMut::new();
        let mut rest: &[u8] = &chunk;
        while let Some(nl) = rest.iter().position(|&b| b == b'\n') {
            let (head, tail) = rest.split_at(nl);
            rest = &tail[1..];
            if self.line_too_long {
                // The end of a skipped line: its bytes were passed on as they came.
                self.line_too_long = false;
                if self.strip {
                    self.event.extend_from_slice(head);
                    self.event.extend_from_slice(b"\n");
                }
                continue;
            }
            let mut line = std::mem::take(&mut self.line);
            line.extend_from_slice(head);
            self.take_line(&line, &mut out);
        }
        if !rest.is_empty() {
            if self.line_too_long || self.line.len() + rest.len() > LINE_BYTES_MAX {
                // Give up on this line; pass its bytes on unread.
                if !self.line_too_long {
                    self.line_too_long = true;
                    let held = std::mem::take(&mut self.line);
                    if self.strip {
                        self.event.extend_from_slice(&held);
                    }
                }
                if self.strip {
                    self.event.extend_from_slice(rest);
                }
            } else {
                self.line.extend_from_slice(rest);
            }
        }
        if !self.strip {
            return chunk;
        }
        // An event that grew huge is not the small usage-only chunk: pass it on.
        if self.event.len() > LINE_BYTES_MAX && !self.drop_event {
            out.extend_from_slice(&std::mem::take(&mut self.event));
        }
        out.freeze()
    }

    /// One complete SSE line (without its `\n`).
    fn take_line(&mut self, line: &[u8], out: &mut BytesMut) {
        let blank = self.read_line(line);
        if self.strip {
            self.event.extend_from_slice(line);
            self.event.extend_from_slice(b"\n");
            if blank {
                let ev = std::mem::take(&mut self.event);
                if !std::mem::take(&mut self.drop_event) {
                    out.extend_from_slice(&ev);
                }
            }
        }
    }

    /// Reads the usage a line may carry; returns whether it is blank (the end of an event).
    fn read_line(&mut self, line: &[u8]) -> bool {
        let text = line.strip_suffix(b"\r").unwrap_or(line);
        if let Some(data) = text.strip_prefix(b"data:") {
            let data = data.strip_prefix(b" ").unwrap_or(data);
            // Only lines that can carry usage are parsed.
            if contains(data, b"usage")
                && let Ok(v) = serde_json::from_slice::<Value>(data)
            {
                if self.strip && is_usage_only_chunk(&v) {
                    self.drop_event = true;
                }
                self.stream_event(&v);
            }
        }
        text.is_empty()
    }

    fn stream_event(&mut self, v: &Value) {
        match self.dialect {
            Dialect::OpenAi => {
                if let Some(u) = v.get("usage").and_then(usage_object) {
                    self.usage = Some(u);
                } else if v
                    .get("type")
                    .and_then(Value::as_str)
                    .is_some_and(|t| matches!(t, "response.completed" | "response.incomplete" | "response.failed"))
                    && let Some(u) = v.get("response").and_then(|r| r.get("usage")).and_then(usage_object)
                {
                    self.usage = Some(u);
                }
            }
            Dialect::Anthropic => {
                let a = &mut self.anthropic;
                match v.get("type").and_then(Value::as_str) {
                    Some("message_start") => {
                        a.start = v.get("message").and_then(|m| m.get("usage")).filter(|u| u.is_object()).cloned();
                        a.merged = a.start.as_ref().and_then(Value::as_object).cloned().unwrap_or_default();
                    }
                    Some("message_delta") => {
                        if let Some(u) = v.get("usage").and_then(Value::as_object) {
                            for (k, val) in u {
                                if !val.is_null() {
                                    a.merged.insert(k.clone(), val.clone());
                                }
                            }
                            a.delta_seen = true;
                        }
                    }
                    _ => {}
                }
                // Complete once the final counts came (a delta), with the input counts known.
                if a.delta_seen {
                    self.usage = usage_object(&Value::Object(a.merged.clone()));
                }
            }
        }
    }

    /// The end of the answer: returns any bytes still held back, and reads a plain answer's usage.
    pub fn finish(&mut self) -> Bytes {
        if !self.sse {
            if !self.body_too_long
                && let Ok(v) = serde_json::from_slice::<Value>(&self.body)
                && let Some(u) = v.get("usage").and_then(usage_object)
            {
                self.usage = Some(u);
            }
            self.body = Vec::new();
            return Bytes::new();
        }
        let mut out = BytesMut::new();
        if !self.line.is_empty() && !self.line_too_long {
            // The last line had no newline: read it, and pass it on as it is.
            let line = std::mem::take(&mut self.line);
            self.read_line(&line);
            if self.strip {
                self.event.extend_from_slice(&line);
            }
        }
        if self.strip && !self.drop_event {
            out.extend_from_slice(&std::mem::take(&mut self.event));
        }
        out.freeze()
    }
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn prices(i: &str, o: &str) -> TokenPrices {
        let i = Micros::parse(i).expect("price");
        let o = Micros::parse(o).expect("price");
        TokenPrices { input: i, output: o, cache_write: i, cache_read: i }
    }

    /// Feeds `body` split at every position in `cuts` and returns (output, usage).
    fn run(m: &mut Meter, body: &[u8], cuts: &[usize]) -> (Vec<u8>, Option<Usage>) {
        let mut out = Vec::new();
        let mut last = 0;
        for &c in cuts.iter().chain(std::iter::once(&body.len())) {
            let c = c.clamp(last, body.len());
            out.extend_from_slice(&m.feed(Bytes::copy_from_slice(&body[last..c])));
            last = c;
        }
        out.extend_from_slice(&m.finish());
        (out, m.usage())
    }

    const OPENAI_STREAM: &str = "data: {\"id\":\"c1\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hel\"}}],\"usage\":null}\n\n\
data: {\"id\":\"c1\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"lo\"}}],\"usage\":null}\n\n\
data: {\"id\":\"c1\",\"choices\":[],\"usage\":{\"prompt_tokens\":1234,\"completion_tokens\":567,\"total_tokens\":1801}}\n\n\
data: [DONE]\n\n";

    const ANTHROPIC_STREAM: &str = "event: message_start\r\ndata: {\"type\":\"message_start\",\"message\":{\"id\":\"m\",\"usage\":{\"input_tokens\":2500,\"cache_creation_input_tokens\":100,\"cache_read_input_tokens\":40,\"output_tokens\":1}}}\r\n\r\n\
event: content_block_delta\r\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"usage is fine\"}}\r\n\r\n\
event: message_delta\r\ndata: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"end_turn\"},\"usage\":{\"output_tokens\":321}}\r\n\r\n\
event: message_stop\r\ndata: {\"type\":\"message_stop\"}\r\n\r\n";

    #[test]
    fn token_cost_rounds_up_per_kind() {
        let p = prices("2.50", "10.00");
        // 1234 × 2.50/M = 0.003085 exactly; 567 × 10/M = 0.00567 exactly.
        assert_eq!(p.cost(&Usage { input: 1234, output: 567, ..Usage::default() }), Micros::from_micros(3085 + 5670));
        // 1 token at 2.50/M is 0.0000025 → rounds up to 0.000003.
        assert_eq!(p.cost(&Usage { input: 1, ..Usage::default() }), Micros::from_micros(3));
        assert_eq!(p.cost(&Usage::default()), Some(Micros::ZERO));
        assert_eq!(p.cost(&Usage { input: u64::MAX, output: u64::MAX, ..Usage::default() }), None);
    }

    #[test]
    fn reads_usage_objects() {
        let v = |s: &str| serde_json::from_str::<Value>(s).expect("json");
        assert_eq!(
            usage_object(&v(r#"{"prompt_tokens":10,"completion_tokens":5}"#)),
            Some(Usage { input: 10, output: 5, ..Usage::default() })
        );
        assert_eq!(
            usage_object(&v(r#"{"input_tokens":10,"output_tokens":5,"cache_read_input_tokens":7}"#)),
            Some(Usage { input: 10, output: 5, cache_read: 7, cache_write: 0 })
        );
        assert_eq!(
            usage_object(&v(r#"{"prompt_tokens":8,"total_tokens":8}"#)),
            Some(Usage { input: 8, ..Usage::default() })
        );
        for bad in [
            r#"{"prompt_tokens":10}"#,
            r#"{"completion_tokens":10}"#,
            r#"{"prompt_tokens":-1,"completion_tokens":5}"#,
            r#"{"prompt_tokens":1.5,"completion_tokens":5}"#,
            r#"{"prompt_tokens":"10","completion_tokens":5}"#,
            r#"{"prompt_tokens":9,"total_tokens":8}"#,
            r#"null"#,
            r#"[]"#,
        ] {
            assert_eq!(usage_object(&v(bad)), None, "{bad}");
        }
    }

    #[test]
    fn openai_stream_usage_at_every_split() {
        let body = OPENAI_STREAM.as_bytes();
        for cut in 0..=body.len() {
            for strip in [false, true] {
                let mut m = Meter::new(Dialect::OpenAi, true, strip);
                let (out, usage) = run(&mut m, body, &[cut, cut + 7]);
                assert_eq!(usage, Some(Usage { input: 1234, output: 567, ..Usage::default() }), "cut {cut}");
                let out = String::from_utf8(out).expect("utf-8");
                if strip {
                    let expected = OPENAI_STREAM.replace(
                        "data: {\"id\":\"c1\",\"choices\":[],\"usage\":{\"prompt_tokens\":1234,\"completion_tokens\":567,\"total_tokens\":1801}}\n\n",
                        "",
                    );
                    assert_eq!(out, expected, "cut {cut}");
                } else {
                    assert_eq!(out, OPENAI_STREAM, "cut {cut}");
                }
            }
        }
    }

    #[test]
    fn stripping_passes_whole_events_at_once() {
        let mut m = Meter::new(Dialect::OpenAi, true, true);
        let first = "data: {\"choices\":[{\"delta\":{\"content\":\"a\"}}],\"usage\":null}\n\n";
        assert_eq!(m.feed(Bytes::from(first)), Bytes::from(first), "a whole event passes at once");
        assert_eq!(m.feed(Bytes::from("data: {\"choices\":[]")), Bytes::new(), "half an event waits");
        assert_eq!(m.feed(Bytes::from(",\"usage\":{\"prompt_tokens\":1,\"completion_tokens\":2}}\n\n")), Bytes::new());
        assert_eq!(m.feed(Bytes::from("data: [DONE]\n\n")), Bytes::from("data: [DONE]\n\n"));
        assert_eq!(m.finish(), Bytes::new());
        assert_eq!(m.usage(), Some(Usage { input: 1, output: 2, ..Usage::default() }));
    }

    /// The Responses API: usage arrives in the final `response.completed` (or
    /// `response.incomplete`, when `max_output_tokens` cut the answer short) event, nested in the
    /// response object; events before it carry `"usage": null`.
    #[test]
    fn responses_stream_usage_at_every_split() {
        for last in ["response.completed", "response.incomplete"] {
            let body = format!(
                "event: response.created\ndata: {{\"type\":\"response.created\",\"response\":{{\"id\":\"r\",\"usage\":null}}}}\n\n\
event: response.output_text.delta\ndata: {{\"type\":\"response.output_text.delta\",\"delta\":\"usage \"}}\n\n\
event: {last}\ndata: {{\"type\":\"{last}\",\"response\":{{\"id\":\"r\",\"usage\":{{\"input_tokens\":321,\"input_tokens_details\":{{\"cached_tokens\":0}},\"output_tokens\":45,\"output_tokens_details\":{{\"reasoning_tokens\":5}},\"total_tokens\":366}}}}}}\n\n"
            );
            let body = body.as_bytes();
            for cut in 0..=body.len() {
                let mut m = Meter::new(Dialect::OpenAi, true, false);
                let (out, usage) = run(&mut m, body, &[cut]);
                assert_eq!(out, body, "passed on unchanged");
                assert_eq!(usage, Some(Usage { input: 321, output: 45, ..Usage::default() }), "{last} cut {cut}");
            }
            let cut = body.len() - 40;
            let mut m = Meter::new(Dialect::OpenAi, true, false);
            assert_eq!(run(&mut m, &body[..cut], &[]).1, None, "a stream cut before its usage has none");
        }
        let plain = br#"{"id":"r","object":"response","output":[],"usage":{"input_tokens":7,"output_tokens":8,"total_tokens":15}}"#;
        let mut m = Meter::new(Dialect::OpenAi, false, false);
        assert_eq!(run(&mut m, plain, &[9]).1, Some(Usage { input: 7, output: 8, ..Usage::default() }));
    }

    #[test]
    fn truncated_openai_stream_has_no_usage() {
        let body = OPENAI_STREAM.as_bytes();
        let cut = OPENAI_STREAM.find("data: {\"id\":\"c1\",\"choices\":[]").expect("usage chunk");
        let mut m = Meter::new(Dialect::OpenAi, true, false);
        let (_, usage) = run(&mut m, &body[..cut + 40], &[]);
        assert_eq!(usage, None);
    }

    #[test]
    fn anthropic_stream_usage_at_every_split() {
        let body = ANTHROPIC_STREAM.as_bytes();
        for cut in 0..=body.len() {
            let mut m = Meter::new(Dialect::Anthropic, true, false);
            let (out, usage) = run(&mut m, body, &[cut]);
            assert_eq!(out, body);
            assert_eq!(usage, Some(Usage { input: 2500, output: 321, cache_write: 100, cache_read: 40 }), "cut {cut}");
        }
        // Cut before the message_delta: the final output count never came.
        let cut = ANTHROPIC_STREAM.find("event: message_delta").expect("delta");
        let mut m = Meter::new(Dialect::Anthropic, true, false);
        assert_eq!(run(&mut m, &body[..cut], &[]).1, None);
    }

    #[test]
    fn plain_answers() {
        let openai = br#"{"id":"x","choices":[{"message":{"content":"hi"}}],"usage":{"prompt_tokens":12,"completion_tokens":34,"total_tokens":46}}"#;
        for cut in 0..=openai.len() {
            let mut m = Meter::new(Dialect::OpenAi, false, true);
            let (out, usage) = run(&mut m, openai, &[cut]);
            assert_eq!(out, openai.to_vec());
            assert_eq!(usage, Some(Usage { input: 12, output: 34, ..Usage::default() }));
        }
        let anthropic = br#"{"type":"message","usage":{"input_tokens":5,"output_tokens":6}}"#;
        let mut m = Meter::new(Dialect::Anthropic, false, false);
        assert_eq!(run(&mut m, anthropic, &[3]).1, Some(Usage { input: 5, output: 6, ..Usage::default() }));
        for bad in [&br#"{"error":{"message":"bad"}}"#[..], b"not json", br#"{"usage":{"prompt_tokens":1}}"#, b""] {
            let mut m = Meter::new(Dialect::OpenAi, false, false);
            assert_eq!(run(&mut m, bad, &[]).1, None);
        }
    }

    #[test]
    fn oversized_lines_and_bodies_leave_usage_unknown() {
        let mut m = Meter::new(Dialect::OpenAi, false, false);
        let big = vec![b' '; JSON_BYTES_MAX];
        m.feed(Bytes::from(big));
        m.feed(Bytes::from_static(br#"{"usage":{"prompt_tokens":1,"completion_tokens":1}}"#));
        m.finish();
        assert_eq!(m.usage(), None);

        // A huge SSE line is passed on untouched and skipped; later lines are read again.
        let mut m = Meter::new(Dialect::OpenAi, true, true);
        let mut body = b"data: ".to_vec();
        body.extend(std::iter::repeat_n(b'x', LINE_BYTES_MAX + 10));
        body.extend_from_slice(b"\n\n");
        let tail = "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":4}}\n\ndata: [DONE]\n\n";
        body.extend_from_slice(tail.as_bytes());
        let (out, usage) = run(&mut m, &body, &[1000, LINE_BYTES_MAX / 2, LINE_BYTES_MAX + 5]);
        assert_eq!(usage, Some(Usage { input: 3, output: 4, ..Usage::default() }));
        assert_eq!(out.len(), body.len() - (tail.len() - "data: [DONE]\n\n".len()));
    }

    proptest::proptest! {
        /// Whatever the chunking, the output without stripping is the input, byte for byte.
        #[test]
        fn passes_bytes_through(body in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..400), cuts in proptest::collection::vec(0usize..400, 0..6)) {
            let mut cuts = cuts;
            cuts.sort_unstable();
            for (dialect, sse) in [(Dialect::OpenAi, true), (Dialect::Anthropic, true), (Dialect::OpenAi, false)] {
                let mut m = Meter::new(dialect, sse, false);
                let (out, _) = run(&mut m, &body, &cuts);
                proptest::prop_assert_eq!(&out, &body);
            }
        }
    }

    use proptest::strategy::Strategy as _;

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(512))]

        /// Any answer, cut anywhere: the meter never panics, passes every byte on unchanged when
        /// it strips nothing, and any usage it reads prices without overflow or is unknown.
        #[test]
        fn any_answer_cut_anywhere_passes_through(
            body in proptest::prop_oneof![
                proptest::collection::vec(proptest::prelude::any::<u8>(), 0..2048),
                "(data: \\{\"usage\":\\{\"prompt_tokens\":[0-9]{1,25},\"completion_tokens\":[0-9]{1,25}\\}\\}\n\n|event: x\n|data: \\[DONE\\]\n\n|[ -~]{0,40}\n){0,20}"
                    .prop_map(String::into_bytes),
            ],
            cuts in proptest::collection::vec(0usize..2048, 0..8),
            sse in proptest::prelude::any::<bool>(),
            anthropic in proptest::prelude::any::<bool>(),
        ) {
            let dialect = if anthropic { Dialect::Anthropic } else { Dialect::OpenAi };
            let mut meter = Meter::new(dialect, sse, false);
            let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c.min(body.len())).collect();
            cuts.push(body.len());
            cuts.sort_unstable();
            let (mut out, mut at) = (Vec::new(), 0);
            for c in cuts {
                out.extend_from_slice(&meter.feed(Bytes::copy_from_slice(&body[at..c])));
                at = c;
            }
            out.extend_from_slice(&meter.finish());
            if sse {
                proptest::prop_assert_eq!(&out, &body, "passed on unchanged");
            }
            if let Some(u) = meter.usage() {
                let prices = TokenPrices { input: Micros::MAX, output: Micros::MAX, cache_write: Micros::MAX, cache_read: Micros::MAX };
                let _ = prices.cost(&u);
            }
        }
    }
}
