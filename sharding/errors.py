"""The exception types of jaxlm, under one base class, each with the exit code the CLI returns.

This module imports nothing of jaxlm (``sharding`` and ``pallas_kernels`` raise these too), and
``jaxlm.errors`` re-exports it. Every error's message is one line a user can act on: what is
wrong and how to fix it. ``jaxlm`` (the command line) prints ``jaxlm: error: <message>`` on
stderr and exits with the error's ``exit_code``:

====================  =====  ==============================================================
type                  code   raised for
====================  =====  ==============================================================
``ConfigError``        2     a config key, value, command-line argument or path given by the
                             user (usage error, like argparse's own exit code 2)
``DataError``         65     input data that cannot be read (``EX_DATAERR``): text that is not
                             UTF-8, a JSONL line that is not an object, a prepared directory
                             that does not match its meta.json
``CheckpointError``   74     a checkpoint that cannot be read or written (``EX_IOERR``): corrupt
                             files, a read-only directory, a full disk
``InteropError``      65     a foreign model file (Hugging Face, GGUF) that cannot be converted
``ServeError``        69     the server cannot start (``EX_UNAVAILABLE``), e.g. the port is taken
``DistributedError``  75     a multi-process job cannot start or lost a peer (``EX_TEMPFAIL``:
                             restart the job, it resumes from its last checkpoint)
``TrainingDiverged``   1     too many non-finite steps in a row (``jaxlm.train``)
====================  =====  ==============================================================

The codes above 2 are the BSD ``sysexits.h`` values. ``ConfigError`` is also a ``ValueError``
(it was one before this module existed, and callers catch it as such).
"""

from __future__ import annotations


class JaxlmError(Exception):
    """Base of every jaxlm error: one line, and the process exit code the CLI returns for it."""

    exit_code: int = 1


class ConfigError(JaxlmError, ValueError):
    """A configuration or usage problem (a key, a value, an argument, a path), described in one line."""

    exit_code = 2


class DataError(JaxlmError):
    """Input data that cannot be read or tokenized (encoding, format, a mismatched prepared directory)."""

    exit_code = 65  # EX_DATAERR


class CheckpointError(JaxlmError):
    """A checkpoint that cannot be read (missing, truncated, corrupt) or written (read-only, disk full)."""

    exit_code = 74  # EX_IOERR


class InteropError(JaxlmError):
    """A Hugging Face / GGUF model that cannot be read or converted (an unsupported feature or a bad file)."""

    exit_code = 65  # EX_DATAERR


class ServeError(JaxlmError):
    """The HTTP server cannot start or serve (address in use, engine limits)."""

    exit_code = 69  # EX_UNAVAILABLE


class DistributedError(JaxlmError):
    """A multi-process job cannot form (bad launcher environment) or lost a peer."""

    exit_code = 75  # EX_TEMPFAIL: the job may be restarted from its last checkpoint


__all__ = [
    "CheckpointError", "ConfigError", "DataError", "DistributedError", "InteropError", "JaxlmError", "ServeError",
]
