"""Server metrics in the Prometheus text format (version 0.0.4), written by hand: three small classes instead of a
prometheus_client dependency. Counters and histograms are updated from the engine thread and the event loop, so
each takes a lock; gauges are read from the engine when /metrics is scraped."""
from __future__ import annotations

import bisect
import math
import threading

TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)
E2E_BUCKETS = (0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 60.0, 120.0, 240.0)


def _labels(names: tuple[str, ...], values: tuple, extra: str = "") -> str:
    parts = [f'{n}="{_escape(str(v))}"' for n, v in zip(names, values)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


def _escape(value: str) -> str:
    return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r'\"')


def _num(x: float) -> str:
    if math.isinf(x):
        return "+Inf" if x > 0 else "-Inf"
    return repr(float(x)) if isinstance(x, float) else str(x)


class Counter:
    def __init__(self, name: str, doc: str, labels: tuple[str, ...] = ()):
        self.name, self.doc, self.label_names = name, doc, labels
        self._values: dict[tuple, float] = {} if labels else {(): 0}
        self._lock = threading.Lock()

    def inc(self, *labels, amount: float = 1) -> None:
        with self._lock:
            self._values[labels] = self._values.get(labels, 0) + amount

    def get(self, *labels) -> float:
        return self._values.get(labels, 0)

    def render(self) -> list[str]:
        with self._lock:
            items = sorted(self._values.items())
        return [f"# HELP {self.name} {self.doc}", f"# TYPE {self.name} counter"] + [
            f"{self.name}{_labels(self.label_names, k)} {_num(v)}" for k, v in items]


class Histogram:
    def __init__(self, name: str, doc: str, buckets: tuple[float, ...]):
        self.name, self.doc, self.buckets = name, doc, tuple(buckets)
        self._counts = [0] * (len(self.buckets) + 1)  # the last one is +Inf
        self._sum = 0.0
        self._lock = threading.Lock()

    def observe(self, value: float) -> None:
        with self._lock:
            self._counts[bisect.bisect_left(self.buckets, value)] += 1  # le is inclusive
            self._sum += value

    @property
    def count(self) -> int:
        return sum(self._counts)

    @property
    def sum(self) -> float:
        return self._sum

    def render(self) -> list[str]:
        with self._lock:
            counts, total = list(self._counts), self._sum
        lines = [f"# HELP {self.name} {self.doc}", f"# TYPE {self.name} histogram"]
        cumulative = 0
        for le, c in zip((*self.buckets, math.inf), counts):
            cumulative += c
            lines.append(f'{self.name}_bucket{{le="{_num(float(le))}"}} {cumulative}')
        lines += [f"{self.name}_sum {_num(total)}", f"{self.name}_count {cumulative}"]
        return lines


def gauge(name: str, doc: str, value: float) -> list[str]:
    return [f"# HELP {name} {doc}", f"# TYPE {name} gauge", f"{name} {_num(value)}"]


class Metrics:
    """Everything /metrics reports. The engine loop feeds the token counters and latency histograms, the HTTP
    middleware the request counter; render(llm) adds the engine's gauges at scrape time."""

    def __init__(self):
        self.http_requests = Counter("dsv2_http_requests_total", "HTTP requests by endpoint and status code.",
                                     ("endpoint", "status"))
        self.prompt_tokens = Counter("dsv2_prompt_tokens_total", "Prompt tokens of the requests accepted.")
        self.generation_tokens = Counter("dsv2_generation_tokens_total", "Tokens generated.")
        self.finished = Counter("dsv2_requests_finished_total",
                                "Completions finished, by reason (stop, length, abort: client gone or shutdown).",
                                ("finish_reason",))
        self.ttft = Histogram("dsv2_time_to_first_token_seconds",
                              "From a request entering the engine queue to its first generated token.", TTFT_BUCKETS)
        self.itl = Histogram("dsv2_inter_token_latency_seconds",
                             "Time between consecutive generated tokens of one request.", ITL_BUCKETS)
        self.e2e = Histogram("dsv2_e2e_request_latency_seconds",
                             "From a request entering the engine queue to its last token.", E2E_BUCKETS)

    def render(self, llm) -> str:
        alloc = llm.allocator
        lines = []
        for metric in (self.http_requests, self.prompt_tokens, self.generation_tokens, self.finished):
            lines += metric.render()
        lines += gauge("dsv2_num_requests_running", "Sequences in the running batch.", llm.num_running)
        lines += gauge("dsv2_num_requests_waiting", "Sequences queued for admission.", llm.num_waiting)
        lines += gauge("dsv2_kv_cache_usage_ratio", "Fraction of latent-cache blocks in use (0..1).", alloc.usage)
        lines += gauge("dsv2_kv_cache_used_blocks", "Latent-cache blocks referenced by sequences.",
                       alloc.num_used_blocks)
        lines += gauge("dsv2_kv_cache_total_blocks", "Latent-cache blocks in all.", alloc.num_blocks)
        lines += ["# HELP dsv2_preemptions_total Sequences preempted (recomputed later) for lack of cache blocks.",
                  "# TYPE dsv2_preemptions_total counter", f"dsv2_preemptions_total {llm.stats['preemptions']}"]
        for h in (self.ttft, self.itl, self.e2e):
            lines += h.render()
        return "\n".join(lines) + "\n"
