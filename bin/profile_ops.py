"""Summarise a jax.profiler trace per HLO op, by source scope where a benchmark saved its HLO (grpo/profile_ops.py).

    bin/bench_train --rows 16 --repeats 1 --tails completion --profile_dir runs/prof   # writes and summarises
    bin/profile_ops runs/prof/completion     # again; or a bin/train --output_dir traced with --profile_steps A,B
"""

from absl import flags

from bin import cli

flags.DEFINE_string("trace_dir", None, "Where jax.profiler wrote (the newest trace under it is read): a --profile_dir "
                    "of bin/bench_train or bin/bench_sample, or a bin/train --output_dir traced with --profile_steps.")


def main(argv: list[str]) -> None:
    cli.expand_user("trace_dir")
    dirs = [d for d in [flags.FLAGS.trace_dir, *argv[1:]] if d]  # the flag, or the only argument (the older form)
    if len(dirs) != 1:
        raise cli.FlagError(f"--trace_dir: expected one directory (the flag or one argument), got {dirs or 'none'}")
    from grpo.profile_ops import trace_summary  # after the checks: grpo imports jax

    with cli.flag_errors("--trace_dir: ", (ValueError, OSError)):
        print(trace_summary(dirs[0]))


if __name__ == "__main__":
    cli.run(main)
