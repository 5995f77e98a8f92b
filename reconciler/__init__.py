"""batch-reconciler: no batch of file-processing work is ever left stuck.

The Python API is `reconciler.client.Client`; the service is `reconciler run`.
"""

__version__ = "0.1.0"
