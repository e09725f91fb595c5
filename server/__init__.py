"""cnp_server: the gRPC concept audit service (``cnp-server``).

Importing the package is cheap on purpose (worker processes and tools import parts of
it), so nothing here may pull in SQLAlchemy, MLflow or torch.
"""

from cnp_core import __version__

__all__ = ["__version__"]
