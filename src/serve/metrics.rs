//! `GET /metrics`: the server's counters in the Prometheus text format, kept by the `prometheus`
//! crate: requests by route and status, prompt and generated tokens, running and waiting
//! sequences, the batch size per step, time to first token and the time between tokens.

use prometheus::{Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry, TextEncoder};

/// Every metric of one server, registered in its own registry.
pub struct ServeMetrics {
    registry: Registry,
    pub requests: IntCounterVec,
    pub prompt_tokens: IntCounter,
    pub generated_tokens: IntCounter,
    pub running: IntGauge,
    pub waiting: IntGauge,
    /// Sequences (a request's `n` samples each count) accepted and not yet in the batch.
    pub waiting_sequences: IntGauge,
    /// Requests finished, whatever the outcome.
    pub finished: IntCounter,
    pub batch_size: Histogram,
    pub time_to_first_token: Histogram,
    pub time_per_token: Histogram,
}

impl ServeMetrics {
    pub fn new() -> Self {
        let registry = Registry::new_custom(Some("talaria".into()), None).expect("a valid prefix");
        let requests = IntCounterVec::new(
            Opts::new("http_requests_total", "HTTP requests answered, by route and status"),
            &["route", "status"],
        )
        .expect("valid metric");
        let counter = |name: &str, help: &str| IntCounter::new(name, help).expect("valid metric");
        let gauge = |name: &str, help: &str| IntGauge::new(name, help).expect("valid metric");
        let histogram = |name: &str, help: &str, buckets: Vec<f64>| {
            Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets)).expect("valid metric")
        };
        let m = Self {
            requests,
            prompt_tokens: counter("prompt_tokens_total", "Prompt tokens of the requests that started"),
            generated_tokens: counter("generation_tokens_total", "Tokens generated"),
            running: gauge("running_sequences", "Sequences in the running batch"),
            waiting: gauge("waiting_requests", "Requests accepted and not yet running"),
            waiting_sequences: gauge(
                "waiting_sequences",
                "Sequences accepted and not yet in the running batch",
            ),
            finished: counter("finished_requests_total", "Requests finished, whatever the outcome"),
            batch_size: histogram(
                "batch_size",
                "Sequences decoded or prefilled per engine step",
                vec![1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0],
            ),
            time_to_first_token: histogram(
                "time_to_first_token_seconds",
                "From a request's arrival to its first generated token",
                prometheus::exponential_buckets(0.001, 2.0, 16).expect("valid buckets"),
            ),
            time_per_token: histogram(
                "time_per_output_token_seconds",
                "Between two generated tokens of one sequence",
                prometheus::exponential_buckets(0.0001, 2.0, 16).expect("valid buckets"),
            ),
            registry,
        };
        for c in [
            Box::new(m.requests.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(m.prompt_tokens.clone()),
            Box::new(m.generated_tokens.clone()),
            Box::new(m.running.clone()),
            Box::new(m.waiting.clone()),
            Box::new(m.waiting_sequences.clone()),
            Box::new(m.finished.clone()),
            Box::new(m.batch_size.clone()),
            Box::new(m.time_to_first_token.clone()),
            Box::new(m.time_per_token.clone()),
        ] {
            m.registry.register(c).expect("each metric registered once");
        }
        m
    }

    /// The text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = vec![];
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .expect("encoding to memory cannot fail");
        String::from_utf8(out).expect("the text format is UTF-8")
    }
}

impl Default for ServeMetrics {
    fn default() -> Self {
        Self::new()
    }
}
