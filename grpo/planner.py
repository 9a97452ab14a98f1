"""Plans: how many micro-batches the step takes and how many rows one sampler call takes, for the model being run
on the machine at hand.

The plan comes from XLA's memory analysis of the programs themselves, compiled from abstract shapes before any
weight loads (as bin/inspect does): the fewest micro-batches whose step fits the device budget, then the most
rows per sampler call whose sampler fits beside what the step keeps between steps (params, Adam moments, the
reference copy). A search compiles a handful of programs at most; each plan is cached on disk per shape
(`$AHA_CACHE_DIR/plans`), so re-running a command compiles nothing here. Where the analysis is unavailable
(a backend without memory_analysis), the machine's checked plan (grpo/presets.py) scales to the shape instead.

Compiling for an accelerator on a CPU (tests, bin/inspect, a laptop planning a TPU run) uses float32 compute:
XLA:CPU makes float32 copies of bf16 weights that an accelerator never makes, and float32 activations bound the
bf16 ones from above.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import re
from collections.abc import Callable
from pathlib import Path

from grpo.presets import AUTO, GIB, MACHINES, PROMPT_TOKENS, Machine

PLAN_VERSION = 1  # bump when the search or the programs change what a cached plan means


@dataclasses.dataclass(frozen=True)
class Plan:
    """Micro-batches and rows per sampler call, with the peaks they were chosen by and why."""

    num_micro_batches: int
    rollout_rows: int
    step_bytes: int | None  # per device; None: not analysed
    rollout_bytes: int | None  # per device, with the step's stored state
    budget_bytes: int
    how: str  # "memory analysis" | "checked plan"
    compiles: int = 0  # programs compiled to make it (0: from the cache or the table)

    def describe(self) -> str:
        def size(n):
            return "?" if n is None else f"{n / GIB:.1f} GiB"

        return (f"{self.num_micro_batches} micro-batches (step peak {size(self.step_bytes)}), {self.rollout_rows} "
                f"rows per sampler call (rollout peak {size(self.rollout_bytes)}), budget {size(self.budget_bytes)} "
                f"per device; from {self.how}" + (f", {self.compiles} programs compiled" if self.compiles else ""))


def compiled_peak_bytes(compiled) -> int:
    """XLA's memory analysis of a compiled program: arguments + outputs - aliased (donated) + temporaries."""
    m = compiled.memory_analysis()
    return m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes


def out_of_memory_advice(error: Exception, planned: bool) -> str | None:
    """One line for XLA's out-of-memory error (None for any other error): what lowers memory, and that the
    run's checkpoints are kept. Unplanned runs (no --machine) are pointed at the planner first."""
    wanted = re.search(r"Out of memory allocating (\d+) bytes", str(error))  # XLA:CPU says so as INTERNAL
    if not wanted and "RESOURCE_EXHAUSTED" not in str(error):
        return None
    size = f" ({int(wanted.group(1)) / GIB:.1f} GiB in one buffer)" if wanted else ""
    plan = "" if planned else "--machine auto (plans micro-batches and sampler rows for this machine's memory), "
    return (f"out of memory{size}: use {plan}--remat, fewer --prompts_per_step / --num_generations, more "
            f"--num_micro_batches, or --lora_rank 16; re-run the same command to continue from the last checkpoint")


# ------------------------------------------------------------------------------------------------ machines


def auto_machine(devices: list) -> Machine:
    """--machine auto: the platform, device count and memory per device as JAX reports them. On CPU (whose
    memory_stats has no limit) it is the `cpu` machine; an accelerator that does not report its memory is an
    error naming --machine."""
    platform = devices[0].platform
    if platform == "cpu":
        return MACHINES["cpu"]
    try:
        stats = devices[0].memory_stats() or {}
    except Exception:  # noqa: BLE001 (a PJRT plugin may raise UNIMPLEMENTED instead of returning None)
        stats = {}
    limit = stats.get("bytes_limit")
    if not limit:
        raise ValueError(f"--machine: auto cannot read the memory of this {platform} device ({devices[0].device_kind}"
                         f": memory_stats() has no bytes_limit); name a machine instead")
    n = len(devices)
    like = _nearest_checked(platform, limit / GIB, n)
    return dataclasses.replace(like, name=AUTO, about=f"{n} x {devices[0].device_kind}, {limit / GIB:.1f} GiB each "
                               f"(read from JAX; fallback plan from {like.name})", devices=n,
                               device_gib=limit / GIB, mesh=f"data=1,fsdp={n}")


def _nearest_checked(platform: str, gib: float, devices: int) -> Machine:
    """The table machine of this platform with the most usable memory per device at most `gib` (with AUTO_SLACK:
    a TPU core reports a little less than its nominal memory) and, among those, the most devices up to `devices`
    (full fine-tuning fits over 8 chips where one takes LoRA); else the smallest."""
    size = lambda m: (m.usable_bytes(), m.devices or 0)  # noqa: E731
    same = sorted((m for m in MACHINES.values() if m.platform == platform), key=size)
    if not same:
        same = [MACHINES["gpu-80g"]]
    below = [m for m in same if m.usable_bytes() <= AUTO_SLACK * gib * GIB and (m.devices or 0) <= devices]
    return below[-1] if below else same[0]


AUTO_SLACK = 1.1


def resolve_machine(name: str, devices: list) -> Machine:
    """--machine NAME (or auto, read from JAX), checked against the devices present."""
    from grpo.presets import get_machine

    machine = auto_machine(devices) if name == AUTO else get_machine(name)
    check_devices(machine, len(devices), devices[0].platform)
    return machine


def check_devices(machine: Machine, present: int, backend: str) -> None:
    """A machine's mesh must match the devices this process sees (bin/train)."""
    if machine.devices is not None and present != machine.devices:
        raise ValueError(f"--machine: {machine.name} has {machine.devices} devices but {present} {backend} "
                         f"device(s) are present; pick the machine you are on (or --machine auto)")


def check_platform(machine: Machine, backend: str) -> None:
    """A machine's budget is its devices' memory: planning a GPU's on a CPU would plan past this box's RAM."""
    if machine.platform != backend:
        raise ValueError(f"--machine: {machine.name} is a {machine.platform} machine but JAX runs on {backend} here; "
                         f"pick the machine you are on (or --machine auto)")


# ------------------------------------------------------------------------- the checked plan (the fallback)


def per_device_tokens(machine: Machine) -> float:
    """Tokens one device holds in one micro-batch at the checked shape."""
    return machine.rows * machine.seq_len / (machine.num_micro_batches * (machine.devices or 1))


def plan_micro_batches(machine: Machine, rows: int, seq_len: int, shards: int, given: int | None) -> int:
    """Micro-batches for a `rows` x `seq_len` batch from the machine's checked shape: at least the machine's own,
    and enough that a device's tokens per micro-batch stay within it. `given`: an explicit --num_micro_batches,
    kept if it fits, else an error naming it. No count works: an error naming --prompts_per_step."""
    limit = per_device_tokens(machine)
    fits = lambda m: rows % (shards * m) == 0 and rows * seq_len / (m * shards) <= limit * (1 + 1e-9)
    if given is not None:
        if not fits(given):
            raise ValueError(f"--num_micro_batches: {given} micro-batches put {rows * seq_len / (given * shards):,.0f}"
                             f" tokens on a device at once; {machine.name} was checked at {limit:,.0f}: use more "
                             f"micro-batches (dividing the {rows} rows over {shards} devices)")
        return given
    for m in range(machine.num_micro_batches, rows // shards + 1):
        if fits(m):
            return m
    raise ValueError(f"--prompts_per_step: {rows} rows of {seq_len} tokens cannot be split over {shards} devices "
                     f"into micro-batches of at most {limit:,.0f} tokens per device ({machine.name}'s checked shape); "
                     f"use fewer prompts or generations, a multiple of {shards} rows, or shorter --max_new_tokens")


def plan_rollout_rows(machine: Machine, rows: int, seq_len: int, given: int | None) -> int:
    """Rows per sampler call from the checked shape: the checked rollout's tokens (rollout_rows x seq_len) cap it."""
    cap = max(1, machine.rollout_rows * machine.seq_len // seq_len)
    if given:
        if given > cap:
            raise ValueError(f"--rollout_batch_size: {given} rows of {seq_len} tokens exceed {machine.name}'s checked "
                             f"rollout ({machine.rollout_rows} rows of {machine.seq_len}); use <= {cap}")
        return given
    return min(rows, cap)


def full_state_bytes(model_cfg, shards: int) -> int:
    """Per device: float32 params + gradients + two Adam moments of full fine-tuning (FSDP-split)."""
    return model_cfg.num_params() * 16 // shards


def check_full_fine_tuning(machine: Machine, model_cfg, shards: int, lora_rank: int) -> None:
    """Full fine-tuning whose float32 state alone exceeds the machine: one line naming --lora_rank."""
    need = full_state_bytes(model_cfg, shards)
    if lora_rank == 0 and need > machine.budget_bytes():
        raise ValueError(f"--lora_rank: full fine-tuning of {model_cfg.name} keeps {need / GIB:.1f} GiB of float32 "
                         f"params, gradients and Adam moments per device, more than {machine.name}'s "
                         f"{machine.device_bytes() / GIB:.0f} GiB; use --lora_rank 16")


def rollout_bytes(model_cfg, rows: int, seq_len: int, *, sample_dtype_bytes: int, stored_bytes_per_device: int) -> int:
    """An upper bound on one device's memory during a rollout of `rows` x `seq_len`, written out (bin/inspect's
    machine check): the stored state, the sampling weights as one full copy, the whole KV cache of the call, and
    three [rows, vocab] float32 logits buffers. No sharding of the sampler is assumed."""
    c = model_cfg
    weights = c.num_params() * sample_dtype_bytes
    kv = rows * seq_len * 2 * c.num_layers * c.num_kv_heads * c.head_dim * sample_dtype_bytes
    logits = 3 * rows * c.vocab_size * 4
    return stored_bytes_per_device + weights + kv + logits


def fits(nbytes: float, machine: Machine) -> bool:
    return nbytes <= machine.budget_bytes()


# --------------------------------------------------------------------------------------- the analysed plan


def micro_batch_counts(rows: int, shards: int) -> list[int]:
    """Every micro-batch count that splits `rows` evenly over `shards` devices, fewest first."""
    per_device = rows // shards if rows % shards == 0 else 0
    return [m for m in range(1, per_device + 1) if per_device % m == 0]


def rollout_row_counts(rows: int, group: int) -> list[int]:
    """Rows per sampler call to try, most first: whole groups, halving the prompts per call."""
    prompts, out = rows // group, []
    while prompts >= 1:
        out.append(prompts * group)
        prompts = math.ceil(prompts / 2) if prompts > 1 else 0
    return sorted(set(out), reverse=True)


@dataclasses.dataclass(frozen=True)
class Peak:
    """XLA's memory analysis of one program, per device: what does not scale with the batch (arguments and
    outputs, less the donated ones) and the temporaries, which do."""

    fixed: int
    temp: int

    @property
    def total(self) -> int:
        return self.fixed + self.temp


TOO_BIG = Peak(2**62, 0)  # a program the compiler refused for memory (XLA:TPU checks its HBM when compiling)


def first_fitting(candidates: list[int], peak: Callable[[int], Peak | None], budget: int,
                  temp_scale: Callable[[int, int], float]) -> tuple[int, int] | None:
    """The first candidate (in order) whose peak fits the budget, or None. Candidates are ordered so the peak
    shrinks along the list (more micro-batches, or fewer rows per call). Returns (candidate, its peak bytes).

    One compile of the first candidate gives its fixed part and its temporaries; temp_scale(first, c) says how
    the temporaries scale to candidate c (c0 / c for micro-batches, c / c0 for rows). Temporaries that scale
    this way only in part make that an underestimate, so every candidate it rules out is truly out, and the
    first one it admits is compiled to check; if that misses, the rest of the list is bisected. Typically two
    compiles, at most 2 + log2(len(candidates)). Raises LookupError when the analysis is unavailable."""
    first = peak(candidates[0])
    if first is None:
        raise LookupError("memory analysis unavailable")
    if first.total <= budget:
        return candidates[0], first.total
    if first is TOO_BIG:  # the compiler refused it for memory: no sizes to scale, so bisect the ordered list
        return _bisect(candidates[1:], peak, budget)
    guess = [c for c in candidates[1:] if first.fixed + first.temp * temp_scale(candidates[0], c) <= budget]
    if not guess:
        return None
    at = candidates.index(guess[0])
    need = peak(candidates[at])
    if need is None:
        raise LookupError("memory analysis unavailable")
    if need.total <= budget:
        return candidates[at], need.total
    return _bisect(candidates[at + 1:], peak, budget)


def _bisect(candidates: list[int], peak: Callable[[int], Peak | None], budget: int) -> tuple[int, int] | None:
    """The first fitting candidate of a list along which the peak shrinks, in log2(len) compiles."""
    lo, hi, found = 0, len(candidates) - 1, None
    while lo <= hi:
        mid = (lo + hi) // 2
        need = peak(candidates[mid])
        if need is None:
            raise LookupError("memory analysis unavailable")
        if need.total <= budget:
            found, hi = (candidates[mid], need.total), mid - 1
        else:
            lo = mid + 1
    return found


@dataclasses.dataclass(frozen=True)
class Programs:
    """How to measure a candidate: the step's peak at m micro-batches, the sampler's peak at r rows per call, and
    what the step keeps between steps (added to the sampler's peak: both live on the device during a rollout)."""

    step_peak: Callable[[int], Peak | None]
    sample_peak: Callable[[int], Peak | None]
    stored_bytes: Callable[[], int]


def search(rows: int, group: int, shards: int, budget: int, programs: Programs,
           given: dict[str, int] | None = None) -> Plan:
    """The analysed plan: the fewest micro-batches whose step fits, then the most rollout rows whose sampler fits
    beside the stored state. `given` (num_micro_batches, rollout_batch_size from the command line) is kept if it
    fits, else a ValueError naming the flag. Raises LookupError when the analysis is unavailable."""
    given, compiled = given or {}, []

    def counted(fn):
        def run(x):
            compiled.append(x)
            return fn(x)
        return run

    step_peak, sample_peak = counted(programs.step_peak), counted(programs.sample_peak)
    counts = micro_batch_counts(rows, shards)
    if not counts:
        raise ValueError(f"--prompts_per_step: {rows} rows do not split evenly over {shards} devices")
    if "num_micro_batches" in given:
        m = given["num_micro_batches"]
        if m not in counts:
            raise ValueError(f"--num_micro_batches: {m} does not divide the {rows // shards} rows each of the {shards} "
                             f"device(s) holds")
        step = _given(m, step_peak(m), budget, f"--num_micro_batches: with {m} micro-batches the step", "more")
    else:
        step = first_fitting(counts, step_peak, budget, lambda first, m: first / m)
        if step is None:
            raise ValueError(f"--prompts_per_step: even one row per micro-batch ({counts[-1]} micro-batches) does not "
                             f"fit the {budget / GIB:.1f} GiB per device budget; use --lora_rank 16, --remat, fewer "
                             f"--max_new_tokens, or a machine with more memory")
    stored = programs.stored_bytes()
    # The training state is what stays; the whole sampler (its KV cache, an argument, too) scales with the rows:
    # as "temporaries", first_fitting's estimate for fewer rows stays a lower bound.
    rollout_peak = lambda r: None if (p := sample_peak(r)) is None else (  # noqa: E731
        p if p is TOO_BIG else Peak(stored, p.fixed + p.temp))
    if given.get("rollout_batch_size"):
        r = given["rollout_batch_size"]
        rollout = _given(r, rollout_peak(r), budget, f"--rollout_batch_size: {r} rows per sampler call with the "
                         "training state", "fewer")
    else:
        rollout = first_fitting(rollout_row_counts(rows, group), rollout_peak, budget, lambda first, r: r / first)
        if rollout is None:
            raise ValueError(f"--num_generations: one prompt's {group} rows per sampler call do not fit beside the "
                             f"training state in {budget / GIB:.1f} GiB per device; use --lora_rank 16, fewer "
                             f"--num_generations or --max_new_tokens")
    return Plan(step[0], rollout[0], step[1], rollout[1], budget, "memory analysis", len(compiled))


def _given(value: int, need: Peak | None, budget: int, what: str, advice: str) -> tuple[int, int]:
    """(value, its peak) for a value given on the command line, which must fit: else a ValueError starting with
    `what` (it names the flag). LookupError when the analysis is unavailable."""
    if need is None:
        raise LookupError("memory analysis unavailable")
    if need.total > budget:
        raise ValueError(f"{what} needs {need.total / GIB:.1f} GiB per device, over the {budget / GIB:.1f} GiB "
                         f"budget; use {advice} (or leave it to the plan)")
    return value, need.total


def checked_plan(machine: Machine, rows: int, seq_len: int, shards: int, given: dict[str, int]) -> Plan:
    """The fallback: the machine's checked shape scaled to this batch (plan_micro_batches, plan_rollout_rows)."""
    m = plan_micro_batches(machine, rows, seq_len, shards, given.get("num_micro_batches"))
    r = plan_rollout_rows(machine, rows, seq_len, given.get("rollout_batch_size"))
    return Plan(m, r, None, None, machine.budget_bytes(), f"{machine.name}'s checked plan (no memory analysis)")


def cache_dir() -> Path:
    from model.default_model import cache_dir as model_cache

    return model_cache() / "plans"


def cached_search(key: dict, search_fn: Callable[[], Plan]) -> Plan:
    """search_fn's plan, stored under a hash of `key` (everything the programs depend on); a hit compiles nothing.
    An unwritable cache only costs the compiles next time."""
    name = hashlib.sha256(json.dumps({**key, "version": PLAN_VERSION}, sort_keys=True,
                                     default=str).encode()).hexdigest()[:24]
    path = cache_dir() / f"{name}.json"
    try:
        return dataclasses.replace(Plan(**json.loads(path.read_text())), compiles=0)
    except (OSError, ValueError, TypeError):
        pass
    plan = search_fn()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(dataclasses.asdict(plan)))
        tmp.replace(path)
    except OSError:
        pass
    return plan


def plan_run(machine: Machine, model_cfg, grpo_cfg, mesh, *, lora_cfg, param_dtype, rows: int, prompt_len: int,
             new_tokens: int, stop_states: int, backend: str, given: dict[str, int]) -> Plan:
    """The plan for one bin/train run on `machine`: analysed (and cached) where the backend can analyse memory,
    else the machine's checked plan. grpo_cfg is the run's, with its rollout fields aligned."""
    from model.sampler import prompt_bucket

    seq_len = prompt_bucket(prompt_len) + new_tokens
    on_target = backend == machine.platform
    programs = run_programs(model_cfg, grpo_cfg, mesh, lora_cfg=lora_cfg, param_dtype=param_dtype, rows=rows,
                            seq_len=seq_len, prompt_len=prompt_len, new_tokens=new_tokens,
                            stop_states=stop_states, on_target=on_target)
    if "rollout_batch_size" in given:  # as grpo/rollout.py runs it: 0 is every row at once, else whole groups
        r, group = given["rollout_batch_size"], grpo_cfg.num_generations
        given = {**given, "rollout_batch_size": min(rows, max(1, r // group) * group) if r else rows}
    key = {"model": repr(model_cfg), "grpo": repr(dataclasses.replace(grpo_cfg, num_micro_batches=1)),
           "lora": repr(lora_cfg), "dtype": str(param_dtype), "machine": repr(machine), "backend": backend,
           "budget": machine.budget_bytes(),  # XLA_PYTHON_CLIENT_MEM_FRACTION or the host's RAM moves it
           "mesh": dict(mesh.shape), "jax": _jax_version(), "rows": rows, "prompt": prompt_len, "new": new_tokens,
           "stops": stop_states, "given": given}
    try:
        return cached_search(key, lambda: search(rows, grpo_cfg.num_generations, mesh.size, machine.budget_bytes(),
                                                 programs, given))
    except LookupError:
        return checked_plan(machine, rows, seq_len, mesh.size, given)


# ------------------------------------------------------------------------------- the programs of a GRPO run


def _jax_version() -> str:
    import jax

    return jax.__version__


def run_programs(model_cfg, grpo_cfg, mesh, *, lora_cfg, param_dtype, rows: int, seq_len: int, prompt_len: int,
                 new_tokens: int, stop_states: int, on_target: bool) -> Programs:
    """The step at m micro-batches and the sampler at r rows per call (prefill + decode, G rows per prompt), as
    abstract programs of this run. on_target False (planning an accelerator on a CPU): float32 compute, see the
    module docstring. stored_bytes: the trained weights, their Adam state, a frozen base and a reference copy."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    import grpo
    from model import sampler
    from model.forward import compiling_for_accelerator
    from model.params import abstract_params
    from model.sampling import SamplingConfig

    compute = grpo_cfg.compute_dtype if on_target else None
    tracing = contextlib.nullcontext if on_target else compiling_for_accelerator  # no CPU-only layouts
    keys = ("old_logprobs", "entropy_coef") + (("ref_logprobs",) if grpo_cfg.beta else ())
    policy = grpo.make_policy(model_cfg, lora_cfg)

    shards = mesh.shape.get("fsdp", mesh.size)  # state is sharded over fsdp, replicated over data
    # full fine-tuning with a KL term keeps a frozen reference copy on the device all along, the step included
    reference = (model_cfg.num_params() * jnp.dtype(param_dtype).itemsize // shards
                 if grpo_cfg.beta and isinstance(policy, grpo.FullPolicy) else 0)

    def step_peak(m: int) -> Peak | None:
        cfg = dataclasses.replace(grpo_cfg, num_micro_batches=m, compute_dtype=compute)
        inputs = grpo.abstract_step_inputs(policy, cfg, mesh, rows, seq_len, param_dtype=param_dtype,
                                           optional_keys=keys)
        with tracing():
            p = _peak(grpo.make_policy_step(policy, cfg, mesh).lower(*inputs))
        return p if p in (None, TOO_BIG) else Peak(p.fixed + reference, p.temp)

    sample_dtype = jnp.dtype(compute or param_dtype) if on_target else jnp.dtype(param_dtype)

    def sample_peak(r: int) -> Peak | None:
        group = grpo_cfg.num_generations
        params = abstract_params(model_cfg, sample_dtype)
        tokens = jax.ShapeDtypeStruct((r // group, sampler.prompt_bucket(prompt_len)), jnp.int32)
        pad = jax.ShapeDtypeStruct((r // group,), jnp.int32)
        stops = sampler.StopRule(jax.ShapeDtypeStruct((sampler.EOS_SLOTS,), jnp.int32),
                                 jax.ShapeDtypeStruct((stop_states, model_cfg.vocab_size), jnp.int8))
        sampling = SamplingConfig(temperature=1.0)
        static = dict(cfg=model_cfg, sampling=sampling)
        with tracing():
            prefill = sampler.prefill.lower(params, tokens, pad, stops, jax.random.key(0),
                                            max_new_tokens=new_tokens, repeats=group, **static)
            state = jax.eval_shape(lambda: sampler.prefill(params, tokens, pad, stops, jax.random.key(0),
                                                           max_new_tokens=new_tokens, repeats=group, **static))
            peaks = (_peak(prefill), _peak(sampler.decode.lower(params, state, stops, **static)))
        return None if None in peaks else max(peaks, key=lambda p: p.total)

    def stored_bytes() -> int:
        *state, _ = grpo.abstract_step_inputs(policy, grpo_cfg, mesh, rows, seq_len, param_dtype=param_dtype)
        return sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(state)) // shards + reference

    return Programs(step_peak, sample_peak, stored_bytes)


def _peak(lowered) -> Peak | None:
    """XLA's memory analysis of a lowered program, or None where the backend has none."""
    try:
        m = lowered.compile().memory_analysis()
        return Peak(m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes, m.temp_size_in_bytes)
    except (AttributeError, NotImplementedError, TypeError):
        return None
    except Exception as e:  # XLA:TPU refuses a program over its HBM at compile time: it does not fit
        if "RESOURCE_EXHAUSTED" in str(e) or "Ran out of memory" in str(e):
            return TOO_BIG
        raise


__all__ = ["PROMPT_TOKENS", "Peak", "Plan", "Programs", "auto_machine", "cached_search", "check_devices",
           "check_full_fine_tuning", "checked_plan", "compiled_peak_bytes", "first_fitting", "fits",
           "micro_batch_counts", "plan_micro_batches", "plan_rollout_rows", "plan_run", "rollout_bytes",
           "rollout_row_counts", "search"]
