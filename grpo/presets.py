"""Presets: named sets of bin/train flag defaults. Explicit flags always win over both kinds.

- A recipe (`--recipe NAME`) sets algorithm choices: curriculum, group size, learning rate, token budget, ...
- A machine (`--machine NAME`) sets hardware choices: the mesh, the dtype, remat, the LoRA rank where full
  fine-tuning cannot fit, and the batch shape its plan was checked at. Micro-batches and rollout rows per
  sampler call are planned for the model actually run (grpo/planner.py); the table's values are the fallback
  where XLA's memory analysis is unavailable, and Gemma 2 2B's checked plan (tests/test_machines.py compiles
  its step for every accelerator machine; BUILD.md "Machine presets"). `--machine auto` reads the machine from
  JAX (planner.auto_machine).

`apply` changes only the flags the command line did not set, before any flag is read. Bad names raise
ValueError("--recipe: ...") / ("--machine: ...") naming the flag (bin/ turns them into exit-2 errors).
"""

from __future__ import annotations

import dataclasses
import os

GIB = 2**30
FIT_FRACTION = 0.92  # an 8% margin under the device's memory: XLA's analysis is an estimate
# The share of a GPU's memory JAX's allocator takes for a planned run (XLA_PYTHON_CLIENT_MEM_FRACTION, which bin/train
# sets to this with --machine unless it is set; JAX's own default is 0.75): what a GPU machine's plan may use.
GPU_MEM_FRACTION = 0.9
PROMPT_TOKENS = 256  # TinyZero's max_prompt_length; Countdown prompts bucket below it (grpo/rollout.py)


@dataclasses.dataclass(frozen=True)
class Machine:
    """One machine's hardware choices and the shape its fallback plan was checked at (for Gemma 2 2B)."""

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

    def usable_bytes(self) -> int:
        """The device's memory JAX may use: on a GPU, JAX's allocator takes XLA_PYTHON_CLIENT_MEM_FRACTION of the
        card (GPU_MEM_FRACTION under bin/train --machine; BUILD.md "Machine presets"). `auto` machines hold the
        limit JAX reported, which is that fraction already."""
        if self.platform != "gpu" or self.name == AUTO:
            return self.device_bytes()
        return int(float(os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION", GPU_MEM_FRACTION)) * self.device_bytes())

    def budget_bytes(self) -> int:
        """What a plan may use per device: FIT_FRACTION of its usable memory."""
        return int(FIT_FRACTION * self.usable_bytes())

    def hardware_flags(self) -> dict[str, object]:
        """The hardware flags bin/train and bin/inspect take from the machine (lora_rank 0 too: full fine-tuning
        where it fits, whatever bin/train's default)."""
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
    # A laptop or a small CPU box: float32 (bf16 is slower on CPU), the laptop recipe's shape and its LoRA rank 16
    # (bin/train's default: full fine-tuning is much slower and larger on a laptop, BUILD.md "Machine presets").
    Machine("cpu", "CPU (this machine's RAM; float32)", "cpu", None, None, None, "float32", 2, True, 16, 48,
            PROMPT_TOKENS + 64, 48),
)}
ACCELERATORS = tuple(name for name, m in MACHINES.items() if m.platform != "cpu")
AUTO = "auto"  # --machine auto: planner.auto_machine reads the machine from JAX

RECIPES: dict[str, dict[str, object]] = {
    # The CPU recipe (BUILD.md, "Laptop runs"): the difficulty ladder with the learning mechanisms of the ladder
    # recipe below at CPU size, LoRA (bin/train's default), remat (the step's activations otherwise dominate a
    # laptop's memory), dynamic sampling capped at 2x (each extra round is a full sampling pass on a CPU).
    "laptop": {
        "curriculum": "countdown", "shaping": "first_rung", "promote_at": 0.35, "stop_at_answer": True,
        "skip_zero_std_groups": True, "dynamic_sampling": True, "max_oversample": 2.0, "entropy_coef": 0.0,
        "adaptive_entropy": True, "level_mix": True, "prompts_per_step": 6, "num_generations": 8,
        "max_new_tokens": 64, "learning_rate": 1e-5, "steps": 15, "eval_every": 5, "eval_size": 16,
        "checkpoint_every": 5, "remat": True,
    },
    # The ladder on one accelerator (the algorithm; --machine stays the hardware): reward shaping on the first
    # rung only (no fixed answer template pays above it), dynamic sampling up to 3x, an adaptive entropy bonus
    # instead of a fixed one, prompts mixed over the levels up to the frontier, held-out sets of 64 puzzles per
    # level (smaller sets are too noisy to compare evals: BUILD.md).
    "ladder": {
        "curriculum": "countdown", "shaping": "first_rung", "promote_at": 0.35, "stop_at_answer": True,
        "skip_zero_std_groups": True, "dynamic_sampling": True, "max_oversample": 3.0, "entropy_coef": 0.0,
        "adaptive_entropy": True, "level_mix": True, "prompts_per_step": 32, "num_generations": 8,
        "max_new_tokens": 128, "learning_rate": 1e-5, "steps": 300, "eval_every": 10, "eval_size": 64,
        "checkpoint_every": 50,
    },
    # TinyZero's GRPO run on Countdown (BUILD.md lists each value with the file it comes from): 128 prompts x
    # 5 completions, lr 1e-6, k3 KL at 0.001, verl's entropy bonus 0.001, PPO clip 0.2 both sides, 1,024 new
    # tokens, temperature 1, its reward and puzzles only, sampling on to EOS, and none of bin/train's learning
    # mechanisms beyond it (the adaptive entropy controller is on by default there).
    "tinyzero": {
        "curriculum": "off", "stop_at_answer": False, "skip_zero_std_groups": False, "adaptive_entropy": False,
        "prompts_per_step": 128,
        "num_generations": 5, "learning_rate": 1e-6, "beta": 0.001, "entropy_coef": 0.001, "epsilon_low": 0.2,
        "epsilon_high": 0.2,
        "max_new_tokens": 1024, "temperature": 1.0, "loss_type": "token_mean", "scale_rewards": "group",
        "warmup_steps": 0, "weight_decay": 0.0, "max_grad_norm": 1.0,
    },
}


def get_machine(name: str) -> Machine:
    """A table machine by name (`auto` is read from the devices by planner.resolve_machine, where a tool runs on
    them: bin/train, bin/bench_grpo)."""
    if name == AUTO:
        raise ValueError(f"--machine: auto reads the devices JAX runs on (bin/train, bin/bench_grpo); here name one "
                         f"of {', '.join(MACHINES)}")
    if name not in MACHINES:
        raise ValueError(f"--machine: unknown machine {name!r}; choose from {', '.join([*MACHINES, AUTO])}")
    return MACHINES[name]


def recipe(name: str) -> dict[str, object]:
    if name not in RECIPES:
        raise ValueError(f"--recipe: unknown recipe {name!r}; choose from {', '.join(sorted(RECIPES))}")
    return RECIPES[name]


def claim_gpu_memory() -> None:
    """Before JAX starts a backend: let its GPU allocator take GPU_MEM_FRACTION of the card unless the user chose
    (a no-op on TPU and CPU)."""
    os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", str(GPU_MEM_FRACTION))


def apply(flag_values, values: dict[str, object]) -> None:
    """Set each value on the flags (absl FlagValues) the command line did not set."""
    for flag, value in values.items():
        if flag in flag_values and not flag_values[flag].present:
            flag_values[flag].value = value
