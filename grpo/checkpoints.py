"""Orbax checkpoints of the whole training state, so a run killed at any moment resumes on the same trajectory.

What is saved at step s (the state AFTER s updates): params, optimizer state, and a small JSON record with
the step, the data position, the seed, the state's signature (every leaf's path, shape and dtype) and a checksum
of its bits (`state_checksum`). Saves are asynchronous (training continues while the files are written); orbax
writes into a temporary directory and renames it when complete, so a kill mid-save leaves the previous checkpoint
as the latest one. The last `keep` are kept.

Resume (`restore_latest`) trusts nothing it has not read back: newest first, a checkpoint whose record or
arrays cannot be read (truncated or deleted files) or whose arrays differ from its checksum is moved aside into
`<output_dir>/damaged_checkpoints/` (never deleted) and the next older one is tried. A checkpoint that reads fine
but holds a different state (another model, dtype, or adapter layout) is not damage: it raises CheckpointMismatch
naming the first leaf that differs, since resuming it would be wrong and setting it aside would hide the user's
mistake.
"""

from __future__ import annotations

import inspect
import logging
import re
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

DAMAGED_DIR = "damaged_checkpoints"


def quiet_abandoned_io() -> None:
    """Silence what orbax's abandoned asynchronous reads and writes print after their failure was reported in one
    line (a damaged checkpoint set aside, a full disk): asyncio logs each unretrieved future with a traceback, and
    Python prints "Exception ignored in: <coroutine ...>" for each coroutine collected with its error. For the rest
    of the process; other unraisable errors still print."""
    logging.getLogger("asyncio").disabled = True
    if getattr(sys.unraisablehook, "quiet_abandoned_io", False):
        return
    previous = sys.unraisablehook

    def hook(unraisable):  # only orbax's own coroutines: any other unraisable error still prints
        code = getattr(unraisable.object, "cr_code", None) if inspect.iscoroutine(unraisable.object) else None
        if code is None or "orbax" not in code.co_filename:
            previous(unraisable)

    hook.quiet_abandoned_io = True
    sys.unraisablehook = hook


def error_line(error: Exception) -> str:
    """An orbax / TensorStore error as one short line: TensorStore appends a repr of a bound method and its spec."""
    text = re.split(r"\s*See full TensorStore details", str(error))[0]
    return f"{type(error).__name__}: {' '.join(text.split())[:200]}"


class CheckpointMismatch(ValueError):
    """The latest intact checkpoint holds a different training state than this run builds."""


def state_signature(params, opt_state) -> list[list]:
    """[[path, shape, dtype], ...] of every params and optimizer-state leaf: what a checkpoint must match."""
    out = []
    for name, tree in (("params", params), ("opt_state", opt_state)):
        for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
            out.append([name + jax.tree_util.keystr(path), list(jnp.shape(leaf)), str(jnp.result_type(leaf))])
    return out


@jax.jit
def _leaf_sum(x: jax.Array) -> jax.Array:
    """A leaf's bit patterns summed as uint32, wrapping: the same number in any summation order, so on any mesh;
    any one flipped bit changes it. One leaf per call: XLA:CPU materialises the reinterpreted copy, so the
    temporary is at most the largest leaf, not the whole state."""
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    if x.dtype == jnp.bool_ or x.dtype.itemsize not in (1, 2, 4):
        return jnp.sum(x.astype(jnp.uint32), dtype=jnp.uint32)
    unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[x.dtype.itemsize]
    return jnp.sum(jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32), dtype=jnp.uint32)


def state_checksum(params, opt_state) -> dict[str, list[int]]:
    """{"params": [...], "opt_state": [...]}: a checksum of each leaf's bits (in state_signature's order), saved in
    a checkpoint's record and compared on restore: a file damaged where orbax reads it without an error (flipped
    bits) would otherwise resume as garbage, NaN steps that the guard stops on."""
    out = {}
    for name, tree in (("params", params), ("opt_state", opt_state)):
        sums = [_leaf_sum(leaf) for leaf in jax.tree.leaves(tree)]
        out[name] = [int(np.asarray(x.addressable_data(0))) for x in sums]  # replicated scalars, on every process
    return out


def checksum_mismatch(saved: dict, params, opt_state) -> str | None:
    """The path (state_signature's) of the first leaf whose bits differ from the checksum saved with it, or None."""
    now = state_checksum(params, opt_state)
    paths = [path for path, _, _ in state_signature(params, opt_state)]
    want, got = saved.get("params", []) + saved.get("opt_state", []), now["params"] + now["opt_state"]
    if len(want) != len(got):
        return f"{len(want)} leaves saved, {len(got)} read"
    return next((path for path, w, g in zip(paths, want, got, strict=True) if w != g), None)


def signature_mismatch(saved: list[list], current: list[list]) -> str | None:
    """A one-line description of the first difference between two signatures, or None if they agree."""
    saved_by_path = {p: (s, d) for p, s, d in saved}
    for path, shape, dtype in current:
        if path not in saved_by_path:
            return f"{path} ({shape} {dtype}) is not in the checkpoint"
        if saved_by_path[path] != (shape, dtype):
            s, d = saved_by_path[path]
            return f"{path} is {s} {d} in the checkpoint but {shape} {dtype} in this run"
    extra = sorted(saved_by_path.keys() - {p for p, _, _ in current})
    return f"the checkpoint holds {extra[0]}, which this run does not have" if extra else None


class TrainCheckpointer:
    """orbax's CheckpointManager with a signature in every record and a resume that survives damage."""

    def __init__(self, directory: str | Path, *, keep: int = 3, async_save: bool = True):
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save, create=True)
        self.directory = Path(directory).absolute()
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def save(self, step: int, params, opt_state, record: dict) -> None:
        record = {**record, "signature": state_signature(params, opt_state),
                  "checksum": state_checksum(params, opt_state)}
        args = ocp.args.Composite(
            params=ocp.args.StandardSave(params),
            opt_state=ocp.args.StandardSave(opt_state),
            record=ocp.args.JsonSave(record),
        )
        self._manager.save(step, args=args, force=True)

    def replace(self, step: int, params, opt_state, record: dict) -> None:
        """save, where a checkpoint of `step` may already exist: that one is deleted first."""
        self._manager.wait_until_finished()
        if step in self._manager.all_steps():
            self._manager.delete(step)
        self.save(step, params, opt_state, record)

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def restore(self, step: int, params_like, opt_state_like) -> tuple[dict, object, dict]:
        """Restore onto the shardings and dtypes of `params_like` / `opt_state_like` (arrays or abstract)."""
        abstract = lambda tree: jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)  # noqa: E731
        out = self._manager.restore(
            step,
            args=ocp.args.Composite(
                params=ocp.args.StandardRestore(abstract(params_like)),
                opt_state=ocp.args.StandardRestore(abstract(opt_state_like)),
                record=ocp.args.JsonRestore(),
            ),
        )
        saved = out["record"].get("checksum")  # None: written before checksums
        bad = isinstance(saved, dict) and checksum_mismatch(saved, out["params"], out["opt_state"])
        if bad:
            raise ValueError(f"its arrays read back differ from the checksum saved with them (damaged files; first: "
                             f"{bad})")
        return out["params"], out["opt_state"], out["record"]

    def read_record(self, step: int) -> dict:
        """Only the JSON record of a checkpoint (cheap: no arrays are read)."""
        return self._manager.restore(step, args=ocp.args.Composite(record=ocp.args.JsonRestore()))["record"]

    def latest_record(self, say: Callable[[str], None] = print) -> dict | None:
        """The newest readable checkpoint's record (no arrays read), damaged ones set aside on the way; None if
        there is none."""
        for step in sorted(self._manager.all_steps(), reverse=True):
            try:
                return self.read_record(step)
            except Exception as e:  # noqa: BLE001 (orbax and tensorstore raise many types for a torn file)
                self._set_aside(step, e, say)
        return None

    def restore_latest(self, params_like, opt_state_like, say: Callable[[str], None] = print):
        """(step, params, opt_state, record) of the newest intact checkpoint, or None if there is none.

        Damaged checkpoints on the way are moved aside (one line each through `say`); a checkpoint of a
        different state raises CheckpointMismatch.
        """
        current = state_signature(params_like, opt_state_like)
        for step in sorted(self._manager.all_steps(), reverse=True):
            try:
                record = self.read_record(step)
            except Exception as e:  # noqa: BLE001 (orbax and tensorstore raise many types for a torn file)
                self._set_aside(step, e, say)
                continue
            diff = signature_mismatch(record["signature"], current) if "signature" in record else None
            if diff:
                raise CheckpointMismatch(f"checkpoint {self.directory / str(step)} does not match this run: {diff}")
            try:
                params, opt_state, record = self.restore(step, params_like, opt_state_like)
            except Exception as e:  # noqa: BLE001
                self._set_aside(step, e, say)
                continue
            return step, params, opt_state, record
        return None

    def _set_aside(self, step: int, error: Exception, say: Callable[[str], None]) -> None:
        """Move a damaged checkpoint out of the manager's directory (kept for inspection, never deleted)."""
        aside = self.directory.parent / DAMAGED_DIR / f"{step}-{int(time.time())}"
        if jax.process_index() == 0:
            aside.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(self.directory / str(step)), str(aside))
        quiet_abandoned_io()  # the reads orbax gave up on fail again in the background: this line says it all
        say(f"checkpoint {self.directory / str(step)} is damaged ({error_line(error)}); moved to {aside}, trying the "
            "previous one")
        self._manager.reload()

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()
