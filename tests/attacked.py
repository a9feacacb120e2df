"""A virtual-time run with a stranger's socket on the server's address, for attack tests."""
from __future__ import annotations

from typing import Callable

from fedsim.clock import VirtualTimeLoop
from fedsim.runner import Simulation, build, summarise
from fedsim.scenario import load_scenario
from network.transport import Transport


def attacked_run(overrides: list[str], after_round: int,
                 attack: Callable[[Simulation, Transport], None]) -> tuple[Simulation, object]:
    """Run the scenario; once round ``after_round`` has ended, ``attack(sim, stranger)`` sends
    what it likes (through the stranger, identity ``mallory``, or the genuine client node).
    Returns the simulation and its summarised result."""
    loop = VirtualTimeLoop()
    sim = build(load_scenario(None, overrides), loop)
    stranger = Transport(router=False, address=sim.server_transport.address, identity=b"mallory",
                         context=sim.context)
    loop.transports.append(stranger)
    stranger.attach(loop, lambda peer, frames: None)

    def progress(m, total):
        if m.round == after_round:
            attack(sim, stranger)
    try:
        loop.run_until_complete(sim.main(progress))
    finally:
        stranger.close()
        sim.close()
        loop.close()
    return sim, summarise(sim, 0.0)
