"""The service's actors: each an async `run()` started by the supervisor."""
