"""Capacity planning off-line: a discrete-event simulator of a queue and a pool (`engine`), the
policies it compares (`baselines`: ours, KEDA-style, fixed), bundled workloads (`scenarios`) and
charts. Pure but for `charts`, which writes a PNG; nothing here runs in the operator's loop."""
