"""The planner: model configs, hardware, per-unit costs, instances, solvers and their checks.

Pure functions: no I/O beyond reading config and profile files, no torch, deterministic.
"""
