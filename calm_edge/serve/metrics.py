"""The server's Prometheus metrics (`GET /metrics`), in a registry of their own.

Latencies are histograms in seconds. Time per output token is observed once per step that
gives a request tokens: the time since its previous tokens divided by how many arrived (K at a
time for CALM), so CALM and AR servers report the same quantity.
"""
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)


class Metrics:
    def __init__(self, max_batch):
        self.registry = registry = CollectorRegistry()
        self.requests = Counter("calm_edge_requests", "HTTP requests answered, by endpoint and status code",
                                ["endpoint", "status"], registry=registry)
        self.prompt_tokens = Counter("calm_edge_prompt_tokens", "Prompt tokens of admitted requests", registry=registry)
        self.completion_tokens = Counter("calm_edge_completion_tokens", "Tokens generated", registry=registry)
        self.queue_length = Gauge("calm_edge_queue_length", "Requests waiting for a row of the batch", registry=registry)
        self.running = Gauge("calm_edge_running_requests", "Requests in the running batch", registry=registry)
        self.occupancy = Gauge("calm_edge_batch_occupancy", "Running requests / max batch", registry=registry)
        self.max_batch = max_batch
        self.ttft = Histogram("calm_edge_time_to_first_token_seconds", "From a request's arrival to its first tokens",
                              buckets=LATENCY_BUCKETS, registry=registry)
        self.per_token = Histogram("calm_edge_time_per_output_token_seconds",
                                   "Time between a request's tokens, per token", buckets=TOKEN_BUCKETS,
                                   registry=registry)
        self.duration = Histogram("calm_edge_request_duration_seconds", "From arrival to the last token",
                                  buckets=LATENCY_BUCKETS, registry=registry)
        self.steps = Counter("calm_edge_engine_steps", "Steps of the running batch", registry=registry)

    def batch(self, running, waiting):
        self.running.set(running)
        self.occupancy.set(running / self.max_batch)
        self.queue_length.set(waiting)

    def exposition(self):
        """(body, content type) of the Prometheus text format."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
