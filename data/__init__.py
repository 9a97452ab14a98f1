"""The Countdown task: reward (countdown), puzzle generator and solver (puzzles), prompts, TinyZero data."""
