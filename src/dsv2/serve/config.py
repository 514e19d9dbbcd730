"""What a deployer sets for the server (the `dsv2 serve` flags), and the state the shutdown logic watches.

Limits on one request exist because each unit of them costs every request in the batch something: a sequence is a
batch row and cache blocks; a stop string is scanned (and its prefixes matched for streaming) after every token of
every sequence of its request. Each is a 400 that names the field and the flag, never a silent cut.
"""
from __future__ import annotations

from dataclasses import dataclass, fields


@dataclass
class ServerConfig:
    model_name: str
    api_key: str | None = None
    max_waiting: int = 256  # sequences queued for the batch (a request counts prompts x n); more: 429
    max_seqs_per_request: int = 256  # prompts x n of one request; more: 400
    max_stop_strings: int = 16  # OpenAI allows 4; eval harnesses send a few more
    max_stop_chars: int = 64  # per stop string
    max_body_bytes: int = 16 << 20
    body_timeout: float = 30.0  # seconds the body may stall between two reads (nginx's client_body_timeout); 408

    def __post_init__(self):
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name not in ("model_name", "api_key") and not value > 0:
                flag = "--" + f.name.replace("_", "-")
                raise ValueError(f"ServerConfig.{f.name} ({flag}) is {value!r}; it must be > 0")


class ServerState:
    """What the shutdown logic needs to see: whether we are draining, and how many HTTP requests are open."""

    def __init__(self):
        self.draining = False
        self.in_flight = 0
