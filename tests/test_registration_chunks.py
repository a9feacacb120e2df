"""A client node announces its clients in chunks (the codec caps one msgpack array's length,
so 100,000 ids do not fit in one hello): every chunk registers, and the run sees all clients."""
from __future__ import annotations

from fedsim import node
from fedsim.runner import run
from fedsim.scenario import load_scenario


def test_hello_in_chunks_registers_every_client(monkeypatch):
    monkeypatch.setattr(node, "HELLO_CHUNK", 3)
    result = run(load_scenario(None, ["data.clients=10", "data.dataset=synthetic", "model.kind=logistic",
                                      "algorithm.name=fedavg", "algorithm.local_epochs=1", "run.rounds=1"]))
    s = result.summary
    assert s["messages_down"] == 10 and s["messages_up"] == 10
    hellos = [f for _, e, f in result.events.rows if e == "hello"]
    assert [h["clients"] for h in hellos] == [3, 3, 3, 1]
