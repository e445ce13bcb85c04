"""synapse-xsign: a Matrix cross-signing key service as a Synapse-style module."""

from synapse_xsign_module.hosts.synapse import XSignModule

__version__ = "0.1.0"

__all__ = ["XSignModule", "__version__"]
