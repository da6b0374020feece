"""The server's Prometheus metrics (prometheus_client), in a registry of its own: GET /metrics.

    chatlm_requests_total{path, status}          requests answered, by endpoint and HTTP status
    chatlm_queue_depth                           requests waiting to join the batch
    chatlm_batch_rows                            rows decoded at the last step
    chatlm_batch_size                            histogram: rows decoded per step
    chatlm_time_to_first_token_seconds           histogram: from a request's arrival to its first token
    chatlm_time_per_output_token_seconds         histogram: a step's time, once per token it made
    chatlm_generation_tokens_total               tokens generated
    chatlm_prompt_tokens_total                   prompt tokens admitted
"""
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from serve.engine import Observer

KNOWN_PATHS = ("/", "/health", "/metrics", "/v1/models", "/v1/chat/completions", "/v1/completions", "/api/chat")


class ServeMetrics(Observer):
    content_type = CONTENT_TYPE_LATEST

    def __init__(self):
        self.registry = r = CollectorRegistry()
        self.requests = Counter("chatlm_requests", "Requests answered, by endpoint and HTTP status",
                                ("path", "status"), registry=r)
        self.queue = Gauge("chatlm_queue_depth", "Requests waiting to join the batch", registry=r)
        self.rows = Gauge("chatlm_batch_rows", "Rows decoded at the last step", registry=r)
        self.batch = Histogram("chatlm_batch_size", "Rows decoded per step", registry=r,
                               buckets=(1, 2, 4, 8, 16, 32, 64, 128))
        self.ttft = Histogram("chatlm_time_to_first_token_seconds", "From a request's arrival to its first token",
                              registry=r, buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))
        self.tpot = Histogram("chatlm_time_per_output_token_seconds", "A decoder step's time, once per token it made",
                              registry=r, buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1))
        self.generated = Counter("chatlm_generation_tokens", "Tokens generated", registry=r)
        self.prompt = Counter("chatlm_prompt_tokens", "Prompt tokens admitted", registry=r)

    # ---- the engine's reports (Observer) --------------------------------------------------
    def step(self, rows: int, waiting: int) -> None:
        self.rows.set(rows)
        self.queue.set(waiting)
        if rows:
            self.batch.observe(rows)

    def first_token(self, job, seconds: float) -> None:
        self.ttft.observe(seconds)

    def tokens(self, count: int, seconds_per_token: float) -> None:
        self.generated.inc(count)
        for _ in range(count):
            self.tpot.observe(seconds_per_token)

    # ---- the app's --------------------------------------------------------------------------
    def request(self, path: str, status: int) -> None:
        # Unknown paths share one label: a scan of random URLs must not grow the registry.
        label = path if path in KNOWN_PATHS else "/v1/models/{id}" if path.startswith("/v1/models/") else "other"
        self.requests.labels(label, str(status)).inc()

    def text(self) -> bytes:
        return generate_latest(self.registry)
