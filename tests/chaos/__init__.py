"""Chaos suite: real replicas killed, real servers restarted, real garbage sent, counts checked.

The short form runs in CI; RECONCILER_CHAOS_LONG=1 runs the long form (see harness.py).
"""
