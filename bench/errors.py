"""The harness's one exception: a benchmark that could not run or finish."""


class BenchError(Exception):
    """A benchmark could not run or could not finish; the message says why."""
