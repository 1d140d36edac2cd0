"""Benchmarks: what identity_middleware costs, as ratios against the alternatives.

Each module measures one mechanism against its anchors in a single run and
exposes ``run(quick: bool) -> list[dict]`` (one row per variant) plus its own
``python -m benchmarks.<name>`` entry point. ``python -m benchmarks [--quick]``
runs them all in one process and prints one markdown table with the machine
noted. Absolute times depend on the machine and its neighbours; the ratios,
measured side by side in one run, are what the README quotes.
"""
