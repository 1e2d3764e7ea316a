"""Performance measurement: synthetic preference data, model FLOPs, step timers
(used by scripts/benchmark.py)."""
