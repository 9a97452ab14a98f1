"""The files a run writes next to its checkpoints, and how they survive kills.

    metrics.jsonl        one JSON object per GRPO step ("step" 1, 2, ...)
    eval.jsonl           one per eval ("step" = updates done when it ran; 0 = before training)
    train_samples.jsonl  completions of the first groups of each step (bin/report's browser)
    eval_samples.jsonl   greedy eval completions
    status.json          {"state": "running" | "finished" | "paused" | "stopped" | "failed" | "interrupted", "step":
                         ..., "peak_rss_bytes": ...}
    run_config.json      the model, GRPO, rollout and loop configs of the latest start (bin/report shows it)

Only process 0 writes. Lines are appended and flushed one at a time, so a kill can tear at most the last
line. On resume (`rewind`) every JSON-lines file keeps exactly the lines of the steps the restored checkpoint
covers: a torn last line is dropped and a step re-run after the kill replaces its line instead of repeating
it. status.json says whether the previous process got to its final line: "running" at resume time means it
died (often the OOM killer), and the loop says so with what to change. Starting over where a run already is
(`resume=False`) first moves that run's files into previous_runs/<n>/ (`set_aside_previous_run`): the new run's
checkpoints and logs never mix with the old ones, and nothing is deleted.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import resource
import shutil
import socket
from collections.abc import Callable
from pathlib import Path

import jax
from jax.experimental import multihost_utils

import model
from grpo.checkpoints import quiet_abandoned_io
from grpo.entropy_control import band_note
from grpo.multihost import host_array
from model.tokenizer import Tokenizer, hf_tokenizer_files

JSONL_FILES = ("metrics.jsonl", "train_samples.jsonl", "eval.jsonl", "eval_samples.jsonl")
EVAL_FILES = ("eval.jsonl", "eval_samples.jsonl")
STATUS_FILE = "status.json"
PREVIOUS_RUNS_DIR = "previous_runs"
# Everything the loop, its exports, loggers and tools write into the output directory: what starting over sets aside
# (only these names: an output directory may hold the user's own files too).
RUN_ENTRIES = (*JSONL_FILES, STATUS_FILE, "run_config.json", "checkpoints", "best", "damaged_checkpoints",
               "final_hf", "best_hf", "profile", "tensorboard", "wandb", "report.html", "curves.png")


# transformers' files beside tokenizer.model in an HF checkpoint, copied from the source model into the exports
HF_TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json", "special_tokens_map.json", "chat_template.jinja",
                      "generation_config.json")
LOCK_FILE = ".run.lock"  # held by the process running in the directory; not a RUN_ENTRY, so never set aside
_claimed: dict[Path, object] = {}  # this process's open lock files: a lock lasts as long as its file stays open


def claim_run_dir(out: Path) -> Path:
    """Lock `out` for this process (process 0 of a multi-host run) until it exits, or a ValueError naming
    --output_dir when another process holds it: a second bin/train there would repair the live run's files as if
    it had died, and both would write the same steps. The OS's lock (flock): a killed run releases it, so nothing
    is left to clean up. A file system without locks (some network mounts) runs unlocked."""
    out = Path(out).resolve()
    if jax.process_index() or out in _claimed:
        return out
    f = open(out / LOCK_FILE, "a+")  # noqa: SIM115 (kept open: it holds the lock)
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        f.seek(0)
        holder = f.read().strip()
        f.close()
        if e.errno in (errno.EAGAIN, errno.EACCES):
            raise ValueError(f"--output_dir: another bin/train ({holder or 'a process'}) is running in {out}; let "
                             "it finish (or stop it) first, or pick another --output_dir") from None
        return out
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()} on {socket.gethostname()}\n")  # a shared file system: the pid alone is ambiguous
    f.flush()
    _claimed[out] = f
    return out


class RunWriteError(RuntimeError):
    """A file of the run could not be written (disk full, quota, a read-only mount): one line naming it."""


def quiet_failed_writes() -> None:
    """For a process that ends on a failed write (bin/train): orbax's asynchronous writes leave asyncio futures whose
    exceptions nobody retrieves, logged with tracebacks at exit after the one-line error that already said what
    failed (grpo.checkpoints.quiet_abandoned_io)."""
    quiet_abandoned_io()


def describe_write_failure(error: Exception, what: str) -> RunWriteError:
    """One line for a failed write of `what`: the file and the OS's reason when the error names them (orbax
    and tensorstore put both in the message), else the error's first line."""
    text = " ".join(str(error).split())
    found = re.search(r'Failed writing: "([^"]+)": (.*?)(?: \[|$)', text)
    if isinstance(error, OSError) and error.filename:
        return RunWriteError(f"writing {error.filename}: {error.strerror or text}")
    if found:
        return RunWriteError(f"writing {what} ({found.group(1)}): {found.group(2)}")
    return RunWriteError(f"writing {what}: {text[:300]}")


def peak_rss_bytes() -> int:
    """This process's peak resident set size so far (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class RunLog:
    """Console lines and JSON-lines records of a run, and the optional loggers (grpo/loggers.py) that mirror the
    numbers; only process 0 writes."""

    def __init__(self, out: Path, echo: Callable[[str], None] = print, loggers: list | None = None):
        self.out, self.echo = Path(out), echo
        self.main = jax.process_index() == 0
        self.loggers = list(loggers or []) if self.main else []

    def scalars(self, step: int, metrics: dict) -> None:
        """Mirror a step's (or an eval's) numbers to TensorBoard / wandb when asked for."""
        for logger in self.loggers:
            logger.log(step, metrics)

    def close(self) -> None:
        for logger in self.loggers:
            logger.close()
        self.loggers = []

    def write_config(self, config: dict) -> None:
        if self.main:
            _write_atomic(self.out / "run_config.json", json.dumps(config, indent=1, default=str) + "\n")

    def write(self, file: str, record: dict) -> None:
        if self.main:
            try:
                with open(self.out / file, "a") as f:
                    f.write(json.dumps(record) + "\n")
            except OSError as e:
                raise describe_write_failure(e, str(self.out / file)) from None

    def say(self, line: str) -> None:
        if self.main:
            self.echo(line)

    def set_status(self, state: str, step: int, **extra) -> None:
        """status.json: the state, the step, the peak RSS and `extra` (best_step, best_score, reason)."""
        if self.main:
            _write_atomic(self.out / STATUS_FILE, json.dumps({"state": state, "step": step,
                                                              "peak_rss_bytes": peak_rss_bytes(), **extra}) + "\n")

    def previous_config(self) -> dict | None:
        """run_config.json as the last start wrote it (None: none, or unreadable)."""
        try:
            return json.loads((self.out / "run_config.json").read_text())
        except (OSError, ValueError):
            return None

    def previous_status(self) -> dict | None:
        try:
            return json.loads((self.out / STATUS_FILE).read_text())
        except (OSError, ValueError):
            return None

    def rewind(self, step: int) -> list[str]:
        """Keep only the records of steps <= `step` (evals: < 0 when starting over, since eval 0 re-runs).

        Returns one note per file that lost a torn line or lines of steps past the checkpoint.
        """
        notes = []
        for name in JSONL_FILES if self.main else ():
            last = step if step > 0 or name not in EVAL_FILES else -1
            note = _rewind_file(self.out / name, last)
            if note:
                notes.append(f"{name}: {note}")
        return notes


def start_over(out: Path, resume: bool) -> Path | None:
    """resume=False: process 0 sets a previous run in `out` aside (set_aside_previous_run; its directory, or None),
    and every process waits for that before it opens checkpoints/."""
    aside = None if resume or jax.process_index() else set_aside_previous_run(out)
    if not resume and jax.process_count() > 1:
        multihost_utils.sync_global_devices("set_aside_previous_run")
    return aside


def set_aside_previous_run(out: Path) -> Path | None:
    """Move the run files in `out` (RUN_ENTRIES) into out/previous_runs/<n>/, n one past the highest there; returns
    that directory, or None when `out` holds no run. Renames only: nothing is copied or deleted."""
    present = [out / name for name in RUN_ENTRIES if (out / name).exists()]
    if not present:
        return None
    taken = [int(p.name) for p in (out / PREVIOUS_RUNS_DIR).glob("*") if p.name.isdigit()]
    aside = out / PREVIOUS_RUNS_DIR / str(max(taken, default=0) + 1)
    aside.mkdir(parents=True)
    for path in present:
        path.rename(aside / path.name)
    return aside


def unclean_stop_hint(previous: dict) -> str:
    """What to say when the previous process died without its final line (status still "running")."""
    rss = previous.get("peak_rss_bytes")
    used = f" (peak RSS {rss / 2**30:.1f} GiB when it last wrote its status)" if rss else ""
    return (f"the previous run stopped without finishing after step {previous.get('step', '?')}{used}; if the "
            f"OOM killer ended it, lower the memory: --remat, more --num_micro_batches, fewer --prompts_per_step "
            f"or --num_generations")


def _rewind_file(path: Path, last_step: int) -> str | None:
    if not path.exists():
        return None
    kept, torn, dropped = [], 0, 0
    for line in path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
            step = record.get("step", 0) if isinstance(record, dict) else None
        except ValueError:
            step = None
        if step is None:
            torn += 1
        elif step > last_step:
            dropped += 1
        else:
            kept.append(line)
    if not torn and not dropped:
        return None
    _write_atomic(path, "".join(line + "\n" for line in kept))
    which = f"past step {last_step}" if last_step >= 0 else "(step 0 on: it re-runs)"
    return ", ".join(filter(None, [f"removed {torn} torn line(s)" if torn else "",
                                   f"removed {dropped} line(s) {which}" if dropped else ""]))


def _write_atomic(path: Path, text: str) -> None:
    """Write via a temporary file and rename, so a kill leaves the old or the new file, never half of one."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def export_hf(directory: Path, model_cfg, params: dict, tokenizer_file: str | None) -> None:
    """params as an HF checkpoint in `directory` with the run's tokenizer, so the export loads alone (bin/sample,
    bin/pass_at_k --model_dir); a run started from its own export already reads its tokenizer from there. Every
    process calls it: each tensor is gathered to the hosts (its shards may span processes), process 0 writes."""
    write = jax.process_index() == 0
    try:
        model.save_hf_checkpoint(directory, model_cfg, params, host=host_array, write=write)
        target = Path(directory) / "tokenizer.model"
        if write and tokenizer_file is not None and Path(tokenizer_file).resolve() != target.resolve():
            shutil.copyfile(tokenizer_file, target)
        if write and tokenizer_file is not None:  # what transformers needs to tokenize as Gemma does
            source = Path(tokenizer_file).parent
            for name in HF_TOKENIZER_FILES:  # the source's own (a chat template, tokenizer.json) when it has them
                if (source / name).is_file() and (source / name).resolve() != (Path(directory) / name).resolve():
                    shutil.copyfile(source / name, Path(directory) / name)
            for name, content in hf_tokenizer_files(Tokenizer(target)).items():
                if not (Path(directory) / name).is_file():
                    _write_atomic(Path(directory) / name, json.dumps(content, indent=2) + "\n")
    except Exception as e:  # noqa: BLE001 (safetensors raises its own error type for I/O)
        raise describe_write_failure(e, str(directory)) from None


def console_line(m: dict) -> str:
    """One step's metrics as the line bin/train prints."""
    kl = "   -   " if m.get("kl") is None else f"{m['kl']:.4f}"
    return (f"step {m['step']:4d} | reward {m['reward_mean']:.3f} solved {m['solved_frac']:.2f} "
            f"format {m['format_frac']:.2f} | len {m['completion_len_mean']:5.1f} | kl {kl} "
            f"clip {m.get('clip_frac', 0.0):.3f} | aha {int(m['aha_count'])} | sample {m['sample_s']:.1f}s "
            f"train {m['train_s']:.1f}s | {m['sample_tokens_per_s']:.0f} tok/s" + _entropy_part(m)
            + (f" | level {m['level']}" if "level" in m else "")
            + (f" | x{m['oversample_ratio']:.0f} sampled" if m.get("oversample_ratio", 1) > 1 else "")
            + (" | SKIPPED (non-finite)" if m.get("skipped") else "")
            + (" | no update: no token to learn from" if m.get("num_completion_tokens") == 0 else ""))


def _entropy_part(m: dict) -> str:
    if m.get("entropy") is None:
        return ""
    coef = f" coef {m['entropy_coef_applied']:.3f}" if "entropy_coef_applied" in m else ""
    return f" | entropy {m['entropy']:.2f}{coef}" + (" OUT OF BAND" if band_note(m["entropy"]) else "")


# Settings a resume may change without a note: how long it runs and how it is watched.
UNNOTED_CHANGES = ("train.steps", "train.resume", "train.time_limit_s", "train.log_to", "train.profile_steps",
                   "grpo.total_steps")


def config_changes(old: dict | None, new: dict) -> list[str]:
    """'section.key old -> new' for every setting of run_config.json that differs between two starts (but
    UNNOTED_CHANGES), so a resume with other flags says what it changed."""
    def flat(tree, prefix=""):
        if not isinstance(tree, dict):
            return {prefix[:-1]: tree}
        return {k: v for key, value in tree.items() for k, v in flat(value, f"{prefix}{key}.").items()}

    before, after = flat(old or {}), flat(json.loads(json.dumps(new, default=str)))
    return [f"{key} {before[key]!r} -> {after[key]!r}" for key in after
            if key in before and before[key] != after[key] and key not in UNNOTED_CHANGES]


def check_resume_layout(output_dir: str, resume: bool, lora_cfg, task_flags: dict | None = None,
                        model_dir: Path | None = None) -> None:
    """A run that would resume checkpoints of the other kind (full fine-tuning vs LoRA, or another rank / alpha /
    targets: ValueError naming the flag), or of another task (task_flags, TrainConfig's: ValueError naming the
    first flag that differs), is refused before anything compiles; the checkpoint signature catches the rest
    later. What the last start recorded is run_config.json's. Starting over (resume False) from a model inside the
    run files it sets aside (its own final_hf/) is refused too: the export would lose its tokenizer half-way."""
    out = Path(output_dir)
    if not resume and model_dir is not None:
        inside = [name for name in RUN_ENTRIES if (out / name).exists()
                  and Path(model_dir).resolve().is_relative_to((out / name).resolve())]
        if inside:
            raise ValueError(f"--model_dir: {model_dir} is inside {out / inside[0]}, which --noresume moves into "
                             f"{out / PREVIOUS_RUNS_DIR}/; copy the model elsewhere first, or resume")
    saved = [out / name for name in ("checkpoints", "best") if (out / name).is_dir() and any((out / name).iterdir())]
    if not resume or not saved:  # best/ alone: a run killed before its first checkpoint, whose best/ is resumed
        return
    try:
        config = json.loads((out / "run_config.json").read_text())
    except (OSError, ValueError):
        return
    _check_same_lora(out, config.get("lora"), lora_cfg)
    before = config.get("train", {}).get("task_flags") or {}
    for name, value in (task_flags or {}).items():
        if name in before and before[name] != value:
            raise ValueError(f"--{name}: {out} holds a run with --{name} {before[name]!r}, this one has {value!r} "
                             f"(its puzzles, held-out sets and best/ scores would not match); pass the same value, "
                             f"or use another --output_dir or --noresume (start over there)")


def _check_same_lora(out: Path, previous: dict | None, lora_cfg) -> None:
    now = None if lora_cfg is None or lora_cfg.rank == 0 else {"rank": lora_cfg.rank, "alpha": lora_cfg.alpha,
                                                               "targets": list(lora_cfg.targets)}
    if previous is not None:
        previous = {**previous, "targets": list(previous.get("targets", ()))}
    if previous is None or now is None:
        if previous != now:
            had = "full fine-tuning" if previous is None else f"LoRA rank {previous['rank']}"
            wants = "full fine-tuning" if now is None else f"LoRA rank {now['rank']}"
            raise ValueError(f"--lora_rank: {out} holds checkpoints of a {had} run, this is a {wants} run; use "
                             f"another --output_dir or --noresume")
        return
    for key in ("rank", "alpha", "targets"):
        if previous.get(key) != now[key]:
            raise ValueError(f"--lora_{key}: {out} holds checkpoints of a LoRA run with {key} {previous.get(key)}, "
                             f"this one has {now[key]}; use the same value, another --output_dir or --noresume")
