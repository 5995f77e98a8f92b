"""Benchmark harness: runs the real service against real Postgres and Redis.

Every sub-command works in a throwaway database and Redis namespace and prints one
JSON line on stdout; progress and logs go to stderr. See docs/PERFORMANCE.md.
"""
