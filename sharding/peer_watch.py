"""The lost-peer watch: end this process with one clear line when another process of the job dies.

JAX's coordination service already aborts every process when one stops sending heartbeats, but
its report is a C++ fatal log and its timeout is long. :class:`PeerWatch` is a daemon thread that
publishes a heartbeat counter in the coordination service's key-value store every second and,
once a peer's counter has not moved for ``heartbeat_timeout_s`` seconds, prints
``jaxlm: error: lost process 1 of 2 (no heartbeat for 30 s); ending process 0`` and ends the
process with ``exit_code`` (``os._exit``: collectives waiting on the dead peer never return, so
no Python cleanup could run). A peer that finished on purpose writes ``done`` and is not reported.

The coordination client: jax has no public accessor for it in jax 0.10; :func:`coordination_client`
reads the one ``jax.experimental.multihost_utils`` (and Orbax) use, and returns None, which leaves
only jax's own heartbeat, when a jax version moves it.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from typing import Any, Callable

from jax.experimental import multihost_utils

KEY_PREFIX = "jaxlm/heartbeat/"


def coordination_client() -> Any | None:
    """The connected ``DistributedRuntimeClient`` of ``jax.distributed.initialize``, or None."""
    state = getattr(getattr(multihost_utils, "distributed", None), "global_state", None)
    client = getattr(state, "client", None)
    needed = ("key_value_set", "key_value_dir_get")
    return client if client is not None and all(hasattr(client, n) for n in needed) else None


class PeerWatch(threading.Thread):
    """Heartbeats of ``num_processes`` processes through ``client``'s key-value store.

    ``on_lost(message)`` is called once (from the thread) when a peer or the coordinator is lost;
    the default prints the message and ends the process with ``exit_code``.
    """

    def __init__(
        self,
        client: Any,
        process_id: int,
        num_processes: int,
        heartbeat_timeout_s: float,
        exit_code: int,
        coordinator_address: str = "",
        interval_s: float = 1.0,
        on_lost: Callable[[str], None] | None = None,
    ):
        super().__init__(name="jaxlm-peer-watch", daemon=True)
        self.client, self.me, self.n = client, process_id, num_processes
        self.timeout_s, self.interval_s, self.exit_code = heartbeat_timeout_s, interval_s, exit_code
        self.coordinator_address = coordinator_address
        self.on_lost = on_lost or self._exit
        self.stopped = threading.Event()
        # Set at interpreter exit: the heartbeats go on (peers still running must not report this
        # process) and a peer that died still ends this one with its one line, instead of jax's
        # shutdown barrier waiting for it; a coordinator gone after the shutdown barrier is normal.
        self.exiting = threading.Event()

    def _exit(self, message: str) -> None:
        print(f"jaxlm: error: {message}; ending process {self.me}", file=sys.stderr, flush=True)
        os._exit(self.exit_code)

    def _lost(self, message: str) -> None:
        if not self.stopped.is_set():
            self.stopped.set()
            self.on_lost(message)

    def run(self) -> None:
        last_value: dict[int, str] = {}
        last_change = {p: time.monotonic() for p in range(self.n) if p != self.me}
        beat = 0
        while not self.stopped.wait(self.interval_s):
            beat += 1
            try:
                self.client.key_value_set(f"{KEY_PREFIX}{self.me}", str(beat), allow_overwrite=True)
                entries = self.client.key_value_dir_get(KEY_PREFIX)
            except Exception as e:  # the coordination service lives in process 0
                if self.exiting.is_set():
                    return
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                who = "the coordinator" if self.me != 0 else "the coordination service"
                self._lost(f"lost {who} (process 0 at {self.coordinator_address}): {first}")
                return
            now = time.monotonic()
            for key, value in entries:
                p = int(key.rsplit("/", 1)[-1])
                if p != self.me and value != last_value.get(p):
                    last_value[p], last_change[p] = value, now
            silent = sorted(
                p for p, t in last_change.items() if last_value.get(p) != "done" and now - t > self.timeout_s
            )
            if silent:
                names = ", ".join(map(str, silent))
                self._lost(f"lost process {names} of {self.n} (no heartbeat for {self.timeout_s:g} s)")
                return

    def finish(self) -> None:
        """Stop the watch and tell the peers this process ended on purpose."""
        if self.stopped.is_set():
            return
        self.stopped.set()
        try:
            self.client.key_value_set(f"{KEY_PREFIX}{self.me}", "done", allow_overwrite=True)
        except Exception:
            pass  # the peers are ending too; nothing left to tell
