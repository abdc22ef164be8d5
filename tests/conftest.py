"""Shared fixtures: a free rendezvous port for DDP tests, quiet logging, small thread counts."""

from __future__ import annotations

import logging
import os
import socket
import warnings
from collections.abc import Iterator

import pytest
import torch
from hypothesis import HealthCheck, settings


def find_free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def ddp_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[int]:
    """Pin DDP's rendezvous to 127.0.0.1 and a port that is free now (auto ports collide ~1/16)."""
    port = find_free_port()
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(port))
    yield port


@pytest.fixture(autouse=True)
def _quiet_and_seeded() -> Iterator[None]:
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    logging.getLogger("lightning.fabric").setLevel(logging.ERROR)
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
        warnings.filterwarnings("ignore", ".*GPU available but not used.*")
        yield


os.environ.setdefault("PYTHONHASHSEED", "0")


# Hypothesis profiles. "short" is the suite's: derandomized (the same examples every run) and few
# of them. "long" is for `python -m benchmarks.fuzz --profile long` (HYPOTHESIS_PROFILE=long).
# Tests that set max_examples themselves keep their own count under either profile.
settings.register_profile(
    "short",
    max_examples=6,
    derandomize=True,
    deadline=None,
    database=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "long",
    max_examples=200,
    deadline=None,
    database=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "short"))
