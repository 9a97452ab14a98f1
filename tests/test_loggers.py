"""grpo.loggers: --log_to tensorboard / wandb write what was logged (read back from the files, without TensorFlow
or the network), skip what is not a number, and refuse unknown names or missing packages with one line."""

from __future__ import annotations

import importlib.util
import json
import struct
import time

import pytest

from grpo import loggers
from grpo.loggers import check_names, make_loggers, scalars

STEPS = [{"step": s, "reward_mean": 0.25 * s, "kl": None, "level": "3 numbers", "grad_norm": float("nan"),
          "skipped": False, "aha/wait": 2} for s in (1, 2, 3)]
CONFIG = {"learning_rate": 1e-5, "mesh": (1, 2), "output_dir": "x"}


def test_scalars_keeps_finite_numbers_only():
    assert scalars(STEPS[0], "train/") == {"train/reward_mean": 0.25, "train/skipped": 0.0, "train/aha/wait": 2.0}


def test_per_level_dicts_become_one_curve_per_level():
    """Reference: eval.jsonl's nested fields (the per-level evals were dropped: a ladder run logged only the top
    level's solved rate, 0 on a CPU run, while 2x1-9's rose); answer shapes, whose keys are text that changes every
    step, are not logged."""
    row = {"step": 4, "eval_solved_frac": 0.0, "solved_by_level": {"2x1-9": 0.25, "tinyzero": 0.0},
           "aha_by_level": {"2x1-9": {"aha_frac": 0.5, "solved_with_aha": None}}, "answer_templates": {"a + b": 1.0}}
    assert scalars(row, "eval/") == {"eval/eval_solved_frac": 0.0, "eval/solved_by_level/2x1-9": 0.25,
                                     "eval/solved_by_level/tinyzero": 0.0, "eval/aha_by_level/2x1-9/aha_frac": 0.5}


def test_bad_names_are_one_line_errors(monkeypatch):
    assert check_names([]) == [] and make_loggers(["", " "], "unused", {}) == []
    with pytest.raises(ValueError, match=r"^--log_to: unknown logger 'mlflow' \(choose from tensorboard, wandb\)$"):
        check_names(["mlflow"])
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ValueError, match=r"^--log_to tensorboard needs the tensorboardX package: pip install "
                                         r"tensorboardX \(or pip install -e '\.\[tensorboard\]'\)$"):
        check_names(["TensorBoard"])


def tfrecords(path) -> list[bytes]:
    """The records of a TFRecord file (u64 length, u32 crc, data, u32 crc), checksums not checked."""
    data, pos, out = path.read_bytes(), 0, []
    while pos + 12 <= len(data):
        (n,) = struct.unpack("<Q", data[pos : pos + 8])
        out.append(data[pos + 12 : pos + 12 + n])
        pos += 16 + n
    return out


def test_tensorboard_event_files_hold_the_scalars(tmp_path):
    pytest.importorskip("tensorboardX", reason="the tensorboard extra (pip install tensorboardX) is not installed")
    from tensorboardX.proto.event_pb2 import Event

    (lg,) = make_loggers(["tensorboard"], str(tmp_path), CONFIG)
    for row in STEPS:
        lg.log(row["step"], row)
    lg.log(3, {"eval_solved_frac": 0.5}, prefix="eval/")
    lg.close()
    files = list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert len(files) == 1
    got, texts = {}, []
    for rec in tfrecords(files[0]):
        ev = Event.FromString(rec)
        for v in ev.summary.value:
            if v.HasField("simple_value"):
                got[(v.tag, ev.step)] = v.simple_value
            else:
                texts.append(v.tag)
    assert got == {**{("reward_mean", s): 0.25 * s for s in (1, 2, 3)}, **{("skipped", s): 0.0 for s in (1, 2, 3)},
                   **{("aha/wait", s): 2.0 for s in (1, 2, 3)}, ("eval/eval_solved_frac", 3): 0.5}
    assert any(t.startswith("config") for t in texts)


def wandb_records(path) -> list[bytes]:
    """The records of a W&B run file: a 7-byte header, then LevelDB-log blocks of 32 KiB whose chunks (7-byte
    header: crc u32, length u16, type u8 = full / first / middle / last) make up the records."""
    data, pos, out, part = path.read_bytes(), 7, [], b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if (left := 32768 - pos % 32768) < 7:
            pos += left
            continue
        _, n, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk, pos = data[pos + 7 : pos + 7 + n], pos + 7 + n
        part = chunk if kind in (1, 2) else part + chunk
        if kind in (1, 4):
            out.append(part)
    return out


def _wandb_history(path, record_type) -> tuple[dict, dict]:
    """({step: {key: value}}, run config) read from a W&B run file."""
    history, config = {}, {}
    for raw in wandb_records(path):
        try:
            rec = record_type.FromString(raw)
        except Exception:  # noqa: BLE001 (a record still being written: read again on the next poll)
            continue
        if rec.WhichOneof("record_type") == "history":
            items = {i.key or "/".join(i.nested_key): i.value_json for i in rec.history.item}
            history[int(items["_step"])] = {k: float(v) for k, v in items.items() if not k.startswith("_")}
        elif rec.WhichOneof("record_type") == "run":
            assert rec.run.project == "aha-test"
            config = {u.key or "/".join(u.nested_key): u.value_json for u in rec.run.config.update}
    return history, config


def test_wandb_offline_run_holds_the_history(tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason="the wandb extra (pip install wandb) is not installed")
    from wandb.proto.wandb_internal_pb2 import Record

    for key, value in {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_CONSOLE": "off",
                       "WANDB_DISABLE_GIT": "true", "WANDB_DISABLE_CODE": "true", "WANDB_API_KEY": "",
                       "WANDB_PROJECT": "aha-test"}.items():
        monkeypatch.setenv(key, value)
    (lg,) = make_loggers(["wandb"], str(tmp_path), CONFIG)
    for row in STEPS:
        lg.log(row["step"], row)
    lg.close()
    runs = list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1
    want = {s: {"reward_mean": 0.25 * s, "skipped": 0.0, "aha/wait": 2.0} for s in (1, 2, 3)}
    deadline = time.monotonic() + 60  # wandb's service process may still be flushing when finish() returns
    while True:
        history, config = _wandb_history(runs[0], Record)
        if history == want or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert history == want
    assert config["learning_rate"] == "0.00001" and json.loads(config["mesh"]) == [1, 2]


def test_extras_cover_every_logger():
    assert set(loggers.EXTRAS) == set(loggers.LOGGERS)
