"""CutEdge (Lim, Lee, Kwak, Kim, IEEE TSC 2024): online control of a split DNN's cut, the device's clock
and its transmission rate by Lyapunov drift-plus-penalty.

model.py       DVFS tables, power and radio models (data in targets/devices/*.toml)
traces.py      frame-arrival and link-capacity traces (data in targets/traces/), their generators
controller.py  the queues and the per-slot decision; the baselines it is compared with
simulate.py    trace-driven simulation over measured per-layer profiles
cli.py         `edgetvm cutedge simulate|run|trace`, the report and the plots
The real run on the emulated testbed is runtime/cutedge.py.
"""
