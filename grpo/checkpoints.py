"""Orbax checkpoints of the whole training state, so a run killed at any moment resumes on the same trajectory.

What is saved at step s (the state AFTER s updates): params, optimizer state, and a small JSON record with
the step, the data position, the PRNG key data and the run's settings. Saves are asynchronous (training
continues while the files are written); orbax writes into a temporary directory and renames it when
complete, so a kill mid-save leaves the previous checkpoint as the latest one. The last `keep` are kept.
"""

from __future__ import annotations

from pathlib import Path

import jax
import orbax.checkpoint as ocp


class TrainCheckpointer:
    """Thin wrapper over orbax's CheckpointManager: save(step, ...), latest_step(), restore(step, ...)."""

    def __init__(self, directory: str | Path, *, keep: int = 3, async_save: bool = True):
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save, create=True)
        self.directory = Path(directory).absolute()
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def save(self, step: int, params, opt_state, record: dict) -> None:
        args = ocp.args.Composite(
            params=ocp.args.StandardSave(params),
            opt_state=ocp.args.StandardSave(opt_state),
            record=ocp.args.JsonSave(record),
        )
        self._manager.save(step, args=args, force=True)

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
        return out["params"], out["opt_state"], out["record"]

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()
