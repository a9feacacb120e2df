"""Shared fixtures of the low-rank tests (FeDLRT, FedLoRU): data, partitions, a recording comm.

* ``regression``: synthetic linear regression whose true weight has rank r*, split over
  clients IID or skewed (a Dirichlet(alpha) mixture of input clusters per client);
* ``digits``: scikit-learn's 8x8 digits, an MLP 64-64-10, IID clients;
* ``RecordingComm``: a ``LocalComm`` that records every payload sent, per round, kind,
  direction and client, so tests can compare ``payload_bits`` with the docstring formulas.
"""
from __future__ import annotations

import asyncio
import functools
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from algorithms.base import Algorithm, Payload
from tests.fakes import FakeClientContext, LocalComm


@dataclass
class Sent:
    round: int
    direction: str  # "down" or "up"
    kind: str
    client: int
    payload: Payload


class RecordingComm(LocalComm):
    """Records each downlink payload as sent and each uplink payload the server accepted."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.sent: list[Sent] = []

    async def broadcast(self, kind, payload, *, version, to=None):
        def recorded(client):
            msg = payload(client) if callable(payload) else payload
            self.sent.append(Sent(self.round, "down", kind, client, msg))
            return msg
        await super().broadcast(kind, recorded, version=version, to=to)

    async def gather(self, kind, *, version=None, clients=None, deadline_s=None):
        out = await super().gather(kind, version=version, clients=clients, deadline_s=deadline_s)
        for client, reply in out.items():
            self.sent.append(Sent(self.round, "up", kind, client, reply.payload))
        return out


def drive(algorithm: Algorithm, comm: LocalComm, rounds: int, after_round=None) -> None:
    """Run ``rounds`` server rounds; ``after_round(r)`` is called after each."""
    async def go():
        for r in range(rounds):
            comm.round = r
            await algorithm.server_round(comm)
            if after_round is not None:
                after_round(r)
    asyncio.run(go())


def contexts(model: nn.Module, x: torch.Tensor, y: torch.Tensor, parts: list[torch.Tensor],
             seed: int = 0) -> dict[int, FakeClientContext]:
    return {i: FakeClientContext(i, model, x[idx], y[idx], seed=seed) for i, idx in enumerate(parts)}


# --------------------------------------------------------------------------- regression

@dataclass
class Regression:
    x: torch.Tensor
    y: torch.Tensor
    w_true: torch.Tensor
    parts: list[torch.Tensor]

    def model(self) -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(self.x.shape[1], self.y.shape[1], bias=False))

    def loss(self, model: nn.Module, params) -> float:
        with torch.no_grad():
            return float(F.mse_loss(functional_call(model, params, (self.x,)), self.y))

    def smoothness(self) -> float:
        """Largest L-smoothness constant of the clients' MSE losses w.r.t. W: 2 λmax(XᵀX/N)/n."""
        n = self.y.shape[1]
        return max(2 * float(torch.linalg.eigvalsh(self.x[i].T @ self.x[i] / len(i)).max()) / n for i in self.parts)


def regression(partition: str, *, n: int = 20, m: int = 20, rank: int = 4, samples: int = 480, clients: int = 6,
               alpha: float = 0.1, seed: int = 0) -> Regression:
    """Y = X W*ᵀ (noiseless), W* of rank ``rank``. ``partition``: ``iid`` or ``dirichlet``.

    The skewed split draws inputs from 10 clusters (different means and scales) and gives
    each client a Dirichlet(alpha) mixture of clusters, so clients' local losses differ in
    curvature and local minimisers inside a coefficient subspace (client drift).
    """
    g = torch.Generator().manual_seed(seed)
    w_true = torch.randn(n, rank, generator=g) @ torch.randn(rank, m, generator=g) / rank ** 0.5
    rng = np.random.default_rng(seed)
    if partition == "iid":
        x = torch.randn(samples, m, generator=g)
        parts = list(torch.arange(samples).chunk(clients))
    else:
        centres = 0.5 * torch.randn(10, m, generator=g)
        scales = torch.rand(10, m, generator=g) + 0.5
        per_client = samples // clients
        xs, parts = [], []
        for c in range(clients):
            mix = rng.dirichlet([alpha] * 10)
            cluster = torch.as_tensor(rng.choice(10, size=per_client, p=mix))
            xs.append(centres[cluster] + scales[cluster] * torch.randn(per_client, m, generator=g))
            parts.append(torch.arange(c * per_client, (c + 1) * per_client))
        x = torch.cat(xs)
    return Regression(x, x @ w_true.T, w_true, parts)


# --------------------------------------------------------------------------- digits

@dataclass
class Digits:
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    parts: list[torch.Tensor]

    @staticmethod
    def model() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))

    def accuracy(self, model: nn.Module, params) -> float:
        with torch.no_grad():
            return float((functional_call(model, params, (self.x_test,)).argmax(1) == self.y_test).float().mean())


@functools.lru_cache(maxsize=None)
def digits(clients: int = 10, seed: int = 0, partition: str = "iid", alpha: float = 0.1) -> Digits:
    from sklearn.datasets import load_digits
    data = load_digits()
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(data.target))
    x = torch.tensor(data.data[order] / 16.0, dtype=torch.float32)
    y = torch.tensor(data.target[order])
    train = 1400
    if partition == "iid":
        parts = list(torch.arange(train).chunk(clients))
    else:  # Dirichlet(alpha) label skew; every client keeps at least a few samples
        labels = y[:train].numpy()
        owner = np.empty(train, dtype=int)
        for label in range(10):
            idx = np.flatnonzero(labels == label)
            share = rng.dirichlet([alpha] * clients)
            owner[idx] = rng.choice(clients, size=len(idx), p=share)
        for c in range(clients):  # never leave a client empty
            if not (owner == c).any():
                owner[rng.integers(train)] = c
        parts = [torch.as_tensor(np.flatnonzero(owner == c)) for c in range(clients)]
    return Digits(x[:train], y[:train], x[train:], y[train:], parts)


@functools.lru_cache(maxsize=None)
def fedavg_digits(rounds: int, lr: float) -> tuple[float, int]:
    """FedAvg baseline on ``digits()``: (final test accuracy, total client upload bits)."""
    from algorithms.fedavg import FedAvg
    data = digits()
    model = data.model()
    alg = FedAvg(FedAvg.Config(lr=lr, local_epochs=1, batch_size=32), model)
    comm = LocalComm(alg, contexts(model, data.x_train, data.y_train, data.parts))
    drive(alg, comm, rounds)
    return data.accuracy(model, alg.model_params()), comm.uplink_bits


def run_digits(cls, rounds: int, **config) -> tuple[float, int, Algorithm]:
    """(final test accuracy, total client upload bits, algorithm) of ``cls`` on ``digits()``."""
    data = digits()
    model = data.model()
    alg = cls(cls.make_config(config), model)
    comm = LocalComm(alg, contexts(model, data.x_train, data.y_train, data.parts))
    drive(alg, comm, rounds)
    return data.accuracy(model, alg.model_params()), comm.uplink_bits, alg
