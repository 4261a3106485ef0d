"""Shared pytest fixtures."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from hub_server import HubServer, patch_hf_env

# Tiny test models gain nothing from a second intra-op thread, and on a small shared CPU OpenMP workers
# spin-wait against other processes (a tiny conv net's step measured 17 ms with one thread and 2.7 s with
# two under load); subprocess tests such as DDP inherit this too.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread() -> Iterator[None]:
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def hub_server(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Iterator[HubServer]:
    """A local Hub-protocol server that huggingface_hub's real client talks to, for one test.

    HF_ENDPOINT (and huggingface_hub's import-time constants) point at it, uploads skip Xet, the cache is
    a fresh temporary HF_HOME, and no token from the machine leaks in. Yields the :class:`HubServer`:
    ``.url``, ``.token`` (a write token), ``.commit_count(repo_id)``, ``.requests``, ``.files(repo_id)``.
    """
    with HubServer() as server:
        patch_hf_env(monkeypatch, server.url, tmp_path_factory.mktemp("hf_home"))
        yield server
