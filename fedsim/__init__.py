"""fedsim: federated learning on a realistic, scriptable network.

From Python (the command line calls the same functions, see ``fedsim.api``)::

    import fedsim
    result = fedsim.run("scenarios/default.toml", {"algorithm.name": "qrr"}, out="runs/qrr")
    study = fedsim.sweep("scenarios/default.toml", algorithms=["fedavg", "qrr"], bandwidths=["1Mbps", "10Mbps"])
"""
from .api import MissingExtra, Result, SweepResult, algorithms, check, load, plot, run, sweep
from .errors import DataError, ScenarioError

__all__ = ["run", "sweep", "check", "plot", "algorithms", "load", "Result", "SweepResult", "MissingExtra",
           "DataError", "ScenarioError"]
