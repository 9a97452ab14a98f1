"""Machines: named sets of HARDWARE flag defaults (`--machine NAME` in bin/train and bin/inspect).

A machine sets the mesh, the dtype, micro-batches, remat, the LoRA rank where full fine-tuning of Gemma 2 2B
cannot fit, how many rollout rows one sampler call takes, and the batch shape it was checked with (rows per
step x tokens per row). A recipe (bin/recipes.py) sets algorithm choices; explicit flags override both.

"Checked" means: `tests/test_machines.py` compiles Gemma 2 2B's GRPO step for every accelerator machine at
that shape (abstract shapes, fake CPU devices) and XLA's memory analysis of the program stays under
FIT_FRACTION of the machine's per-device memory; the rollout's estimate (`rollout_bytes`, an upper bound
written out below) must fit too. BUILD.md ("Machine presets") holds the table. Nothing here was run on the
machines themselves: they are compile-time checks.

Where a recipe's batch is bigger than the checked one, `plan_micro_batches` raises the number of micro-batches
(and `plan_rollout_rows` caps the rows per sampler call) so that each device never holds more tokens at once
than in the checked shape.
"""

from __future__ import annotations

import dataclasses
import os

from absl import flags

from bin.cli import FlagError

GIB = 2**30
FIT_FRACTION = 0.92  # an 8% margin under the device's memory: XLA's analysis is an estimate
PROMPT_TOKENS = 256  # TinyZero's max_prompt_length; Countdown prompts bucket to 192 here (grpo/rollout.py)


@dataclasses.dataclass(frozen=True)
class Machine:
    """One machine's hardware choices and the shape they were checked at (for Gemma 2 2B)."""

    name: str
    about: str
    platform: str  # "tpu" | "gpu" | "cpu": what jax.default_backend() says there
    devices: int | None  # JAX devices; None: whatever is present (cpu)
    device_gib: float | None  # memory per device; None: this machine's RAM (cpu)
    mesh: str | None
    dtype: str  # --dtype: auto = float32 master weights, bfloat16 compute off-CPU
    num_micro_batches: int
    remat: bool
    lora_rank: int  # 0: full fine-tuning fits
    rows: int  # rows per step the step was checked with (prompts x G)
    seq_len: int  # tokens per row it was checked with (prompt + completion)
    rollout_rows: int  # rows per sampler call at seq_len

    def device_bytes(self) -> int:
        if self.device_gib is not None:
            return int(self.device_gib * GIB)
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")

    def hardware_flags(self) -> dict[str, object]:
        """The hardware flags both tools take from the machine (lora_rank 0 too: full fine-tuning where it fits,
        whatever bin/train's default)."""
        return {"dtype": self.dtype, "num_micro_batches": self.num_micro_batches, "remat": self.remat,
                "lora_rank": self.lora_rank}

    def train_flags(self) -> dict[str, object]:
        """bin/train: the hardware flags and rows per sampler call (mesh None: fsdp over all devices)."""
        return {**self.hardware_flags(), "rollout_batch_size": self.rollout_rows,
                **({"mesh": self.mesh} if self.mesh else {})}

    def inspect_flags(self) -> dict[str, object]:
        """bin/inspect: the hardware flags and the checked batch shape."""
        return {**self.hardware_flags(), "mesh": self.mesh or "data=1,fsdp=1", "batch": self.rows,
                "seq_len": self.seq_len}


SEQ = PROMPT_TOKENS + 1024  # TinyZero's prompt + response budget
MACHINES: dict[str, Machine] = {m.name: m for m in (
    Machine("kaggle-tpu-v5e-8", "Kaggle TPU v5e-8: 8 chips x 16 GiB HBM", "tpu", 8, 16.0,
            "data=1,fsdp=8", "auto", 8, True, 0, 64, SEQ, 32),
    Machine("kaggle-tpu-v3-8", "Kaggle TPU v3-8 (older): 8 cores x 16 GiB", "tpu", 8, 16.0,
            "data=1,fsdp=8", "auto", 8, True, 0, 64, SEQ, 32),
    # One chip: full fine-tuning's float32 params + grads + Adam (42 GB for 2B) cannot fit; LoRA on a bf16 base.
    Machine("colab-tpu-v5e-1", "Colab TPU v5e-1: 1 chip x 16 GiB", "tpu", 1, 16.0,
            "data=1,fsdp=1", "bfloat16", 4, True, 16, 16, SEQ, 16),
    Machine("colab-tpu-v2-8", "Colab TPU v2-8 (older): 8 cores x 8 GiB", "tpu", 8, 8.0,
            "data=1,fsdp=8", "bfloat16", 8, True, 16, 64, SEQ, 8),
    # Turing has no bfloat16 units: XLA computes bf16 work in float32 there (slower), but bf16 storage still
    # halves the memory, which is what lets 2B fit two 15 GiB cards (LoRA on a bf16 base).
    Machine("kaggle-gpu-t4x2", "Kaggle GPU T4 x2: 2 x ~15 GiB usable", "gpu", 2, 15.0,
            "data=1,fsdp=2", "bfloat16", 8, True, 16, 32, SEQ, 16),
    Machine("gpu-80g", "one 80 GB GPU (A100 / H100; 79.6 GiB as the driver reports it)", "gpu", 1, 79.6,
            "data=1,fsdp=1", "auto", 16, True, 0, 64, SEQ, 64),
    # The 2-core box / a laptop: float32 (bf16 is slower on CPU), the laptop recipe's shape (4 x 8 rows).
    Machine("cpu", "CPU (this machine's RAM; float32)", "cpu", None, None, None, "float32", 2, True, 0, 32,
            PROMPT_TOKENS + 64, 32),
)}
ACCELERATORS = tuple(name for name, m in MACHINES.items() if m.platform != "cpu")


def get(name: str) -> Machine:
    if name not in MACHINES:
        raise FlagError(f"--machine: unknown machine {name!r}; choose from {', '.join(MACHINES)}")
    return MACHINES[name]


def apply(flag_values: flags.FlagValues, machine: Machine, values: dict[str, object]) -> None:
    """Set each of the machine's values on the flags the command line did not set."""
    for flag, value in values.items():
        if flag in flag_values and not flag_values[flag].present:
            flag_values[flag].value = value


def check_devices(machine: Machine, present: int, backend: str) -> None:
    """A machine's mesh must match the devices this process sees (bin/train)."""
    if machine.devices is not None and present != machine.devices:
        raise FlagError(f"--machine: {machine.name} has {machine.devices} devices but {present} {backend} "
                        f"device(s) are present; pick the machine you are on (or --machine cpu)")


def per_device_tokens(machine: Machine) -> float:
    """Tokens one device holds in one micro-batch at the checked shape."""
    return machine.rows * machine.seq_len / (machine.num_micro_batches * (machine.devices or 1))


def plan_micro_batches(machine: Machine, rows: int, seq_len: int, shards: int, given: int | None) -> int:
    """Micro-batches for a `rows` x `seq_len` batch on this machine: at least the machine's own, and enough that
    a device's tokens per micro-batch stay within the checked shape. `given`: an explicit --num_micro_batches,
    kept if it fits, else an error naming it. No count works: an error naming --prompts_per_step."""
    limit = per_device_tokens(machine)
    fits = lambda m: rows % (shards * m) == 0 and rows * seq_len / (m * shards) <= limit * (1 + 1e-9)
    if given is not None:
        if not fits(given):
            raise FlagError(f"--num_micro_batches: {given} micro-batches put {rows * seq_len / (given * shards):,.0f}"
                            f" tokens on a device at once; {machine.name} was checked at {limit:,.0f}: use more "
                            f"micro-batches (dividing the {rows} rows over {shards} devices)")
        return given
    for m in range(machine.num_micro_batches, rows // shards + 1):
        if fits(m):
            return m
    raise FlagError(f"--prompts_per_step: {rows} rows of {seq_len} tokens cannot be split over {shards} devices into "
                    f"micro-batches of at most {limit:,.0f} tokens per device ({machine.name}'s checked shape); "
                    f"use fewer prompts or generations, a multiple of {shards} rows, or shorter --max_new_tokens")


def plan_rollout_rows(machine: Machine, rows: int, seq_len: int, given: int | None) -> int:
    """Rows per sampler call: the checked rollout's tokens (rollout_rows x seq_len) are the cap."""
    cap = max(1, machine.rollout_rows * machine.seq_len // seq_len)
    if given:
        if given > cap:
            raise FlagError(f"--rollout_batch_size: {given} rows of {seq_len} tokens exceed {machine.name}'s checked "
                            f"rollout ({machine.rollout_rows} rows of {machine.seq_len}); use <= {cap}")
        return given
    return min(rows, cap)


def full_state_bytes(model_cfg, shards: int) -> int:
    """Per device: float32 params + gradients + two Adam moments of full fine-tuning (FSDP-split)."""
    return model_cfg.num_params() * 16 // shards


def check_full_fine_tuning(machine: Machine, model_cfg, shards: int, lora_rank: int) -> None:
    """Full fine-tuning whose float32 state alone exceeds the machine: one line naming --lora_rank."""
    need = full_state_bytes(model_cfg, shards)
    if lora_rank == 0 and need > FIT_FRACTION * machine.device_bytes():
        raise FlagError(f"--lora_rank: full fine-tuning of {model_cfg.name} keeps {need / GIB:.1f} GiB of float32 "
                        f"params, gradients and Adam moments per device, more than {machine.name}'s "
                        f"{machine.device_bytes() / GIB:.0f} GiB; use --lora_rank 16")


def rollout_bytes(model_cfg, rows: int, seq_len: int, *, sample_dtype_bytes: int, stored_bytes_per_device: int) -> int:
    """An upper bound on one device's memory during a rollout of `rows` x `seq_len`:

    what the step keeps between steps (stored_bytes_per_device: params / base / adapters / Adam, as sharded),
    plus the sampling weights as ONE full copy on one device (the bf16 cast of float32 master weights, or base +
    adapters merged; gathered whole even when they are the params themselves), plus the whole KV cache of the
    call on one device (rows x seq_len x 2 x layers x kv_heads x head_dim), plus three [rows, vocab] float32
    logits buffers. No sharding of the sampler is assumed, so a real run needs less."""
    c = model_cfg
    weights = c.num_params() * sample_dtype_bytes
    kv = rows * seq_len * 2 * c.num_layers * c.num_kv_heads * c.head_dim * sample_dtype_bytes
    logits = 3 * rows * c.vocab_size * 4
    return stored_bytes_per_device + weights + kv + logits


def fits(nbytes: float, machine: Machine) -> bool:
    return nbytes <= FIT_FRACTION * machine.device_bytes()
