"""The web console at /ui/: overview, batches, batch detail, dead letters.

Server-rendered HTML (Jinja2) with one small script for live progress (EventSource
on the API's server-sent events) and confirmations; templates and assets ship in the
package, so it works with no network. `routes.install` mounts it in the API app.
"""
