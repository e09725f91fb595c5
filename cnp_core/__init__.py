"""cnp_core: concept audits (LRP + DRSA) and concept-aware network pruning.

A plain library: the pipeline takes a spec, a progress callback and a cancellation
check, and returns a typed result. It knows nothing of gRPC, job stores or MLflow.
"""

__version__ = "0.1.0"
