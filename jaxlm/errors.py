"""The exception types of jaxlm (defined in :mod:`sharding.errors`, which imports nothing of jaxlm).

See :mod:`sharding.errors` for the table of types and the exit codes the command line returns.
"""

from sharding.errors import (
    CheckpointError,
    ConfigError,
    DataError,
    DistributedError,
    InteropError,
    JaxlmError,
    ServeError,
)

__all__ = [
    "CheckpointError", "ConfigError", "DataError", "DistributedError", "InteropError", "JaxlmError", "ServeError",
]
