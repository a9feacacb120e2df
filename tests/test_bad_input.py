"""Bad bytes sent to a live server socket are rejected, logged, counted; the run finishes
exactly as it would have without them."""
import msgpack
import numpy as np
import torch

from algorithms.base import Payload
from fedsim import codec
from fedsim.clock import VirtualTimeLoop
from fedsim.codec import SERVER, Message
from fedsim.node import HELLO, NODE
from fedsim.runner import build, run, summarise
from fedsim.scenario import load_scenario
from tests.attacked import attacked_run

OVERRIDES = ["run.rounds=3", "data.clients=5", "algorithm.name=fedavg"]


def attacks() -> dict[str, list[bytes]]:
    good = codec.encode(Message(src=3, dst=SERVER, round=1, kind="model", version=1,
                                payload=Payload({"w": torch.ones(4)}), msg_id=99))
    head = codec.peek_route(good[0])
    head["tn"] = [["w", "float32", [2 ** 29]]]  # declares 2 GiB
    env = msgpack.packb(head)
    huge = [codec._CRC.pack(codec.checksum(env)) + env, b"\0" * 16]
    hijack = codec.encode(Message(src=NODE, dst=SERVER, round=-1, kind=HELLO, version=0,
                                  payload=Payload(meta={"clients": [0, 1]})))
    return {
        "random_bytes": [np.random.default_rng(0).bytes(64)],
        "truncated_msgpack": [good[0][:len(good[0]) // 2]],
        "shape_mismatch": [good[0], good[1][:-4]],
        "declared_2GiB": huge,
        "unknown_sender": good,  # well-formed, but client 3 lives on another node
        "route_hijack": hijack,
    }


def test_garbage_to_live_server_is_rejected_and_run_finishes_unchanged():
    clean = run(load_scenario(None, OVERRIDES))

    sent = []

    def attack(sim, stranger):  # mid-run: after registration, before round 1
        for name, frames in attacks().items():
            # Malformed tensors come from the genuine client node (a buggy client passes
            # authentication); the rest from a stranger's socket.
            via = sim.client_transport if name in ("shape_mismatch", "declared_2GiB") else stranger
            via.send(frames)
            sent.append(name)

    _, result = attacked_run(OVERRIDES, 0, attack)
    c = result.summary["counters"]
    assert len(sent) == 6
    assert c["rejected"] == 6, c
    assert c.get("rejected_shape_mismatch") == 1
    assert c.get("rejected_oversized") == 1
    assert c.get("rejected_unknown_sender") == 1
    assert c.get("rejected_ids_held") == 1  # a live session holds them
    assert c.get("rejected_short_header", 0) + c.get("rejected_bad_msgpack", 0) + c.get("rejected_checksum", 0) == 2
    rejects = [f for _, e, f in result.events.rows if e == "reject"]
    assert len(rejects) == 6 and all(r["detail"] for r in rejects)
    assert result.summary["rounds"] == 3
    assert result.summary["model_sha256"] == clean.summary["model_sha256"]


def test_nan_gradient_from_a_client_is_rejected_and_model_stays_finite():
    scenario = load_scenario(None, ["run.rounds=3", "data.clients=5", "algorithm.name=sgd"])
    loop = VirtualTimeLoop()
    sim = build(scenario, loop)
    poisoned = sim.clients[2].data
    poisoned.x = torch.full_like(poisoned.x, float("nan"))  # every gradient of client 2 is NaN
    try:
        loop.run_until_complete(sim.main(None))
    finally:
        sim.close()
        loop.close()
    result = summarise(sim, 0.0)
    assert result.summary["counters"]["bad_reply"] == 3  # one per round, from client 2
    rejects = [f for _, e, f in result.events.rows if e == "reject" and f.get("reason") == "bad_reply"]
    assert {r["src"] for r in rejects} == {2} and all("NaN" in r["detail"] for r in rejects)
    assert all(bool(torch.isfinite(t).all()) for t in result.final_params.values())
    assert result.summary["rounds"] == 3
