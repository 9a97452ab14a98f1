"""The flags that start a multi-host run, and what its processes agree on before the run's first collective: the
flags they were given, and whether each passed its own setup checks. Files and directories are per host (a missing
model on one host, an output directory one host cannot write): a process that stopped alone would leave its peers
waiting in the first collective until the distributed service's shutdown barrier times out, minutes later."""

from __future__ import annotations

import zlib
from collections.abc import Callable
from typing import TypeVar

import jax
import numpy as np
from jax.experimental import multihost_utils

ERROR_BYTES = 1024  # a setup error's one line, as gathered (longer lines are cut)
Result = TypeVar("Result")


def check_coordinator(address: str | None, num_processes: int | None, process_id: int | None) -> None:
    """ValueError naming the flag when the multi-host flags cannot start a run: jax.distributed.initialize waits
    for its peers, so a bad address or process id would hang instead of failing."""
    if address is None:
        for name, value in (("num_processes", num_processes), ("process_id", process_id)):
            if value is not None:
                raise ValueError(f"--{name} needs --coordinator_address (multi-host runs only)")
        return
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"--coordinator_address: expected host:port, got {address!r}")
    if num_processes is None or num_processes < 1:
        raise ValueError(f"--num_processes must be >= 1 with --coordinator_address, got {num_processes}")
    if process_id is None or not 0 <= process_id < num_processes:
        raise ValueError(f"--process_id must be in [0, {num_processes}), got {process_id}")


def first_error(error: str | None) -> str | None:
    """Every process's setup error (None: passed) gathered: the lowest-numbered failing process's line, the same in
    every process, or None when all passed. A collective: every process must call it."""
    mine = np.frombuffer((error or "").encode()[:ERROR_BYTES].ljust(ERROR_BYTES, b"\0"), np.uint8)
    every = np.asarray(multihost_utils.process_allgather(mine)).reshape(-1, ERROR_BYTES)  # [processes, bytes]
    failed = [bytes(row).rstrip(b"\0").decode(errors="replace") for row in every if row.any()]
    return failed[0] if failed else None


def check_same_flags(values: dict[str, object], process_id: int) -> None:
    """ValueError naming the first flag (in the dict's order) whose value differs between processes, compared by
    the CRC of its repr: a run whose processes disagree would train on mismatched batches or deadlock in a
    collective. A collective: every process must call it."""
    mine = np.array([zlib.crc32(f"{name}={value!r}".encode()) for name, value in values.items()], np.int64)
    every = np.asarray(multihost_utils.process_allgather(mine)).reshape(-1, len(values))  # [processes, names]
    differ = [name for name, column in zip(values, every.T, strict=True) if len(set(column.tolist())) > 1]
    if differ:
        raise ValueError(f"--{differ[0]}: the {every.shape[0]} processes were given different values (process "
                         f"{process_id} has {values[differ[0]]!r}); pass the same flags to every process")


def agreed(setup: Callable[[], Result]) -> Result:
    """setup()'s result when it passed in every process; otherwise, in every process, a ValueError with the first
    failing process's message (setup's ValueErrors are the one-line errors that name a flag)."""
    try:
        result, error = setup(), None
    except ValueError as e:
        result, error = None, str(e)
    error = first_error(error)
    if error:
        raise ValueError(error)
    return result


def any_process_stops(reason: str | None) -> str | None:
    """The loop's reason to pause before a step, made the same in every process: a time limit or a signal is seen
    by each process on its own clock, and a process that paused while its peers started the next step would leave
    them waiting in that step's collectives. A collective (one flag per process) with several processes."""
    if jax.process_count() == 1:
        return reason
    wants = np.asarray(multihost_utils.process_allgather(np.array(reason is not None)))
    return reason or ("another process is pausing" if wants.any() else None)


def host_array(x) -> np.ndarray:
    """x as a whole numpy array on this host, also when its shards span other processes' devices (an fsdp axis
    across hosts). A collective with several processes: every process must call it, in the same order."""
    if jax.process_count() == 1 or x.is_fully_addressable:
        return np.asarray(x)
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))

