"""Prometheus metrics of one server, in a registry of its own (two apps in one process never mix numbers).

Engine state (running/waiting requests, slot and page usage, token counters) is read when /metrics is scraped,
so it is never stale; latencies and finish reasons are recorded by the server as each request streams by.
"""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client import CONTENT_TYPE_LATEST  # noqa: F401  (re-exported for the route)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from ..engine.sequence import RequestOutput

TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)


class _EngineCollector:
    """Reads the engine's counters and cache usage at scrape time."""

    def __init__(self, usage, stats, num_pending):
        self.usage, self.stats, self.num_pending = usage, stats, num_pending

    def collect(self):
        u = self.usage()
        gauges = [
            ("qwen3next_requests_running", "requests being decoded or prefilled", u.get("running", 0)),
            ("qwen3next_requests_waiting", "requests queued in the scheduler", u.get("waiting", 0)),
            ("qwen3next_requests_in_flight", "requests the server is streaming (queued + running)",
             self.num_pending()),
            ("qwen3next_state_slots_used", "Gated DeltaNet state slots held by requests", u.get("slots_used", 0)),
            ("qwen3next_state_slots_total", "Gated DeltaNet state slots", u.get("slots_total", 0)),
            ("qwen3next_kv_pages_used", "attention KV-cache pages held by requests", u.get("pages_used", 0)),
            ("qwen3next_kv_pages_total", "attention KV-cache pages", u.get("pages_total", 0)),
        ]
        for name, doc, value in gauges:
            yield GaugeMetricFamily(name, doc, value=value)
        counters = [("qwen3next_preemptions", "requests preempted for lack of KV pages", u.get("preemptions", 0))]
        if self.stats is not None:
            counters += [
                ("qwen3next_prompt_tokens", "prompt tokens accepted", self.stats.prompt_tokens),
                ("qwen3next_generation_tokens", "tokens generated", self.stats.generation_tokens),
            ]
        spec = u.get("speculative")
        if spec:
            counters += [
                ("qwen3next_spec_verify_steps", "sequence-steps that verified MTP drafts", spec["verify_steps"]),
                ("qwen3next_spec_draft_tokens", "MTP draft tokens proposed", spec["draft_tokens"]),
                ("qwen3next_spec_accepted_tokens", "MTP draft tokens accepted", spec["accepted_tokens"]),
                ("qwen3next_spec_disabled_steps", "engine steps with drafting off (measured no gain, or batch cap)",
                 spec["disabled_steps"]),
            ]
            yield GaugeMetricFamily("qwen3next_spec_mean_accepted_length",
                                    "tokens gained per verification (accepted drafts + 1)",
                                    value=spec["mean_accepted_length"] or 0.0)
            per_pos = GaugeMetricFamily("qwen3next_spec_position_acceptance",
                                        "acceptance of the j-th draft, given the earlier ones were accepted",
                                        labels=["position"])
            for j, a in enumerate(spec["per_position_acceptance"]):
                per_pos.add_metric([str(j + 1)], a or 0.0)
            yield per_pos
            policy = GaugeMetricFamily("qwen3next_spec_drafting",
                                       "1 where the adaptive policy drafts at this batch size, 0 where it measured "
                                       "no gain", labels=["batch_size"])
            for bucket, st in spec.get("policy", {}).get("by_batch_size", {}).items():
                policy.add_metric([bucket], 1.0 if st["drafting"] else 0.0)
            yield policy
        for name, doc, value in counters:
            yield CounterMetricFamily(name, doc, value=value)


class ServerMetrics:
    def __init__(self, usage, stats, num_pending):
        self.registry = CollectorRegistry()
        self.registry.register(_EngineCollector(usage, stats, num_pending))
        self.ttft = Histogram("qwen3next_time_to_first_token_seconds", "time from arrival to the first token",
                              buckets=TTFT_BUCKETS, registry=self.registry)
        self.tpot = Histogram("qwen3next_time_per_output_token_seconds",
                              "mean time between output tokens of a finished request",
                              buckets=TPOT_BUCKETS, registry=self.registry)
        self.finished = Counter("qwen3next_requests_finished", "requests ended, by finish reason",
                                ["finish_reason"], registry=self.registry)
        self.rejected = Counter("qwen3next_requests_rejected", "requests refused before generation, by reason",
                                ["reason"], registry=self.registry)

    def observe(self, out: RequestOutput, first: bool) -> None:
        """Record one streamed output; `first` is True for the first output that carries tokens."""
        m = out.metrics or {}
        if first and m.get("first_token_time") is not None and m.get("arrival_time") is not None:
            self.ttft.observe(max(m["first_token_time"] - m["arrival_time"], 0.0))
        if out.finished:
            comp = out.outputs[0]
            self.finished.labels(comp.finish_reason or "unknown").inc()
            n = m.get("num_output_tokens", len(comp.token_ids))
            if n > 1 and m.get("finish_time") is not None and m.get("first_token_time") is not None:
                self.tpot.observe(max(m["finish_time"] - m["first_token_time"], 0.0) / (n - 1))

    def render(self) -> bytes:
        return generate_latest(self.registry)
