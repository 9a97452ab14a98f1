"""Damaged checkpoints, torn JSON lines and failing writes: detected, reported in one line, nothing lost.

References: the state that was saved (restored bitwise), the lines that were written (kept verbatim), and the
error lines' wording (the file named). No tolerances: everything here is exact.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from binaries import CLASSIC_LOOP, FAST_COMPILE, ROOT
from tiny_model import make_tiny_model_dir

from grpo.checkpoints import DAMAGED_DIR, CheckpointMismatch, TrainCheckpointer, checksum_mismatch, state_checksum
from grpo.run_files import RunLog, describe_write_failure

W = np.random.default_rng(0).normal(size=2000).astype(np.float32)  # incompressible: orbax stores the bytes as they are


def _state(scale: float):
    params = {"w": jnp.asarray(W) * scale, "n": {"b": jnp.ones((8, 4)) * scale}}
    return params, {"mu": jnp.zeros(5) + scale}


def _saved(tmp_path: Path, steps=(1, 2, 3)) -> TrainCheckpointer:
    ckpt = TrainCheckpointer(tmp_path / "checkpoints", keep=5, async_save=False)
    for s in steps:
        ckpt.save(s, *_state(float(s)), {"step": s, "data_position": 10 * s})
    ckpt.wait()
    return ckpt


def _biggest_file(directory: Path) -> Path:
    return max((p for p in directory.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


@pytest.mark.parametrize("damage", ["truncate", "delete_manifest", "delete_record", "flip_bits", "checksum"])
def test_damaged_latest_is_set_aside_and_previous_restored(tmp_path, damage):
    """flip_bits: bytes of an array's data file inverted where orbax reads them without an error (the arrays came
    back as garbage before checkpoints carried a checksum); checksum: the record's checksum of another state."""
    ckpt = _saved(tmp_path)
    latest = tmp_path / "checkpoints" / "3"
    if damage == "flip_bits":
        data = _biggest_file(latest / "params")
        raw = bytearray(data.read_bytes())
        raw[100:400] = bytes(b ^ 0xFF for b in raw[100:400])
        data.write_bytes(raw)
    elif damage == "checksum":
        record = next((latest / "record").iterdir())
        text = json.loads(record.read_text())
        text["checksum"]["params"][-1] = (text["checksum"]["params"][-1] + 1) % 2**32
        record.write_text(json.dumps(text))
    elif damage == "truncate":
        with open(_biggest_file(latest / "params"), "r+b") as f:
            f.truncate(64)
    elif damage == "delete_manifest":
        (latest / "params" / "manifest.ocdbt").unlink()
    else:
        for p in (latest / "record").iterdir():
            p.unlink()
    said = []
    step, params, opt_state, record = ckpt.restore_latest(*_state(0.0), say=said.append)
    assert (step, record["data_position"]) == (2, 20)
    np.testing.assert_array_equal(params["w"], W * 2)
    np.testing.assert_array_equal(opt_state["mu"], np.full(5, 2.0))
    assert len(said) == 1 and "checkpoints/3 is damaged" in said[0] and DAMAGED_DIR in said[0]
    if damage in ("flip_bits", "checksum"):
        assert "differ from the checksum saved with them" in said[0]
    assert "TensorStore details" not in said[0] and "bound method" not in said[0]
    aside = list((tmp_path / DAMAGED_DIR).iterdir())
    assert len(aside) == 1 and aside[0].name.startswith("3-")  # kept for inspection, not deleted
    assert not latest.exists()


@pytest.mark.parametrize("bit", [0, 22, 30, 31])  # mantissa, exponent, sign
def test_one_flipped_bit_in_any_leaf_is_named(bit):
    """Reference: the leaf whose bit was flipped. Each leaf keeps its own sum (one sum over leaves weighted by their
    position lost the top bits of even-position leaves: a sign flip there went unseen)."""
    params, opt_state = _state(3.0)
    saved = state_checksum(params, opt_state)
    assert checksum_mismatch(saved, params, opt_state) is None
    for path, leaf in [("params['n']['b']", params["n"]["b"]), ("params['w']", params["w"])]:
        bits = np.asarray(leaf).copy().view(np.uint32)
        bits.flat[7] ^= np.uint32(1 << bit)
        changed = {**params, "n": {"b": jnp.asarray(bits.view(np.float32))}} if "n" in path else {
            **params, "w": jnp.asarray(bits.view(np.float32))}
        assert checksum_mismatch(saved, changed, opt_state) == path


def test_other_state_is_a_mismatch_not_damage(tmp_path):
    ckpt = _saved(tmp_path)
    other = ({"w": jnp.zeros(2000), "n": {"b": jnp.zeros((8, 5))}}, {"mu": jnp.zeros(5)})
    with pytest.raises(CheckpointMismatch, match=r"params\['n'\]\['b'\] is \[8, 4\] float32 in the checkpoint but "
                                                 r"\[8, 5\] float32 in this run"):
        ckpt.restore_latest(*other, say=lambda s: None)
    with pytest.raises(CheckpointMismatch, match="which this run does not have"):
        ckpt.restore_latest({"w": jnp.zeros(2000)}, {"mu": jnp.zeros(5)}, say=lambda s: None)
    assert (tmp_path / "checkpoints" / "3").exists()  # a mismatch moves nothing


def test_rewind_repairs_torn_line_and_drops_steps_past_the_checkpoint(tmp_path):
    lines = [json.dumps({"step": s, "reward_mean": s / 10}) for s in range(1, 6)]
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + '\n{"step": 6, "rew')  # killed mid-write
    (tmp_path / "eval.jsonl").write_text(json.dumps({"step": 0}) + "\n" + json.dumps({"step": 4}) + "\n")
    notes = RunLog(tmp_path, echo=lambda s: None).rewind(3)
    assert (tmp_path / "metrics.jsonl").read_text() == "\n".join(lines[:3]) + "\n"
    assert (tmp_path / "eval.jsonl").read_text() == json.dumps({"step": 0}) + "\n"
    assert notes == ["metrics.jsonl: removed 1 torn line(s), removed 2 line(s) past step 3",
                     "eval.jsonl: removed 1 line(s) past step 3"]
    assert RunLog(tmp_path, echo=lambda s: None).rewind(0) == [
        "metrics.jsonl: removed 3 line(s) past step 0", "eval.jsonl: removed 1 line(s) (step 0 on: it re-runs)"]


def test_write_failure_names_the_file():
    e = OSError(28, "No space left on device", "/run/metrics.jsonl")
    assert str(describe_write_failure(e, "x")) == "writing /run/metrics.jsonl: No space left on device"
    orbax_style = ValueError('OUT_OF_RANGE: Error writing "w/0" in OCDBT: Failed writing: "/run/ckpt/4/d/ab": '
                             "Failed to write 100 bytes to file 12: File too large [os_error_code='27']")
    assert str(describe_write_failure(orbax_style, "checkpoint /run/ckpt")) == (
        "writing checkpoint /run/ckpt (/run/ckpt/4/d/ab): Failed to write 100 bytes to file 12: File too large")


# --- the real binary ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny") / "model")


def _train(model_dir: Path, out: Path, steps: int, file_size_blocks: int | None = None, cache: Path | None = None):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": FAST_COMPILE}
    if cache:
        env["JAX_COMPILATION_CACHE_DIR"] = str(cache)
    cmd = [sys.executable, "-m", "bin.train", f"--model_dir={model_dir}", f"--output_dir={out}", f"--steps={steps}",
           "--prompts_per_step=2", "--num_generations=2", "--max_new_tokens=8", "--eval_size=2",
           "--checkpoint_every=2", "--num_train_puzzles=50", *CLASSIC_LOOP]
    if file_size_blocks:  # a full disk for this process only: writes past the limit fail with EFBIG
        cmd = ["sh", "-c", f'trap "" XFSZ; ulimit -f {file_size_blocks}; exec "$@"', "sh", *cmd]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def two_steps(tiny_dir, tmp_path_factory) -> tuple[Path, Path]:
    """A finished 2-step run (checkpoint at step 2) and its compilation cache; each test continues a copy."""
    work = tmp_path_factory.mktemp("two_steps")
    result = _train(tiny_dir, work / "run", 2, cache=work / "cache")
    assert result.returncode == 0, result.stderr[-2000:]
    return work / "run", work / "cache"


def _copy(run: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(run, tmp_path / "run"))


def test_disk_full_stops_with_one_line_and_loses_nothing(tiny_dir, two_steps, tmp_path):
    out, cache = _copy(two_steps[0], tmp_path), two_steps[1]
    before = (out / "metrics.jsonl").read_text()
    failed = _train(tiny_dir, out, 4, file_size_blocks=40, cache=cache)  # 20 kB: step 4's checkpoint cannot be written
    errors = [line for line in failed.stderr.splitlines() if line.startswith("error:")]
    assert failed.returncode == 1 and len(errors) == 1, failed.stderr[-2000:]
    assert "writing checkpoint" in errors[0] and "File too large" in errors[0]
    assert "Traceback" not in failed.stderr.split(errors[0])[-1]
    assert (out / "metrics.jsonl").read_text().startswith(before)  # nothing written before was lost
    assert json.loads((out / "status.json").read_text())["state"] == "failed"
    again = _train(tiny_dir, out, 4, cache=cache)  # space again: the same command continues from step 2
    assert again.returncode == 0 and "resumed from" in again.stdout and "OOM" not in again.stdout
    assert [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]


def test_unwritable_output_dir_is_reported_before_any_compile(tiny_dir, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    result = _train(tiny_dir, blocker / "run", 2)
    assert result.returncode == 2 and result.stderr.strip().splitlines()[-1].startswith("error: --output_dir:")
    assert "compiling" not in result.stdout and "step" not in result.stdout


def test_checkpoint_of_another_model_is_one_line(two_steps, tmp_path):
    out, cache = _copy(two_steps[0], tmp_path), two_steps[1]
    other = make_tiny_model_dir(tmp_path / "other", seed=1)
    cfg = json.loads((other / "config.json").read_text())
    cfg["intermediate_size"] = 96  # another MLP width: every gate/up/down leaf differs
    (other / "config.json").write_text(json.dumps(cfg))
    import jax

    import model
    from model.checkpoint import save_hf_checkpoint

    mcfg = model.load_config(other)
    save_hf_checkpoint(other, mcfg, model.init_params(jax.random.key(1), mcfg))
    result = _train(other, out, 4, cache=cache)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and lines[-1].startswith("error: --output_dir: checkpoint"), result.stderr[-2000:]
    assert "does not match this run" in lines[-1] and "in the checkpoint but" in lines[-1]
