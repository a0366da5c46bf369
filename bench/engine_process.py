"""Shared by the side-by-side speed benchmarks: each engine is measured in a process of its own
(so no engine's thread pool disturbs another's), and llama.cpp on the embedded default GGUF.

A benchmark script builds its parser with `engine_parser`, and in `main` either measures the one
engine its child invocation names (`args.engine`) or runs every engine through `run_rounds`, which
re-runs the script with `--engine NAME` and reads the JSON line the child prints last. The engines
take turns for several rounds, so that a burst of load on a shared machine hits all of them alike;
each figure is the median over rounds.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

import numpy as np

from trimtab.backend.default_model import default_model_path


def engine_parser(description: str, engines) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3, help="times each engine is run, taking turns")
    parser.add_argument("--decode-tokens", type=int, default=64)
    parser.add_argument("--engine", choices=sorted(engines), help=argparse.SUPPRESS)  # one engine, in a child
    return parser


def run_in_own_process(script: str, name: str, args: argparse.Namespace, extra: tuple[str, ...] = ()):
    """Run `script --engine name` with the same settings (and `extra` arguments); → the JSON value
    it printed last."""
    command = [sys.executable, script, "--engine", name, "--threads", str(args.threads),
               "--repeats", str(args.repeats), "--decode-tokens", str(args.decode_tokens), *extra]
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def run_rounds(script: str, engines: dict, args: argparse.Namespace, extra: tuple[str, ...] = ()) -> dict:
    """Every engine `args.rounds` times, taking turns, each in its own process.

    engines: {key: engine class with a `name`}; a child prints a number or a list of numbers.
    → {engine name: the median over rounds (per element for a list)}.
    """
    runs = {key: [] for key in engines}
    for round_ in range(args.rounds):
        for key, cls in engines.items():
            runs[key].append(run_in_own_process(script, key, args, extra))
            print(f"round {round_ + 1}/{args.rounds} {cls.name}: {runs[key][-1]}", file=sys.stderr, flush=True)
    return {engines[key].name: _median(values) for key, values in runs.items()}


def _median(values: list):
    if isinstance(values[0], list):
        return [statistics.median(column) for column in zip(*values)]
    return statistics.median(values)


class LlamaCppEngine:
    """llama.cpp (llama-cpp-python) on a GGUF (by default the embedded default model's own Q4_1), greedy."""
    name = "llama.cpp (llama-cpp-python), the Q4_1 GGUF"

    def __init__(self, threads: int, context: int, batch: int = 512, path=None):
        from llama_cpp import Llama

        self.llm = Llama(model_path=str(path or default_model_path()), n_threads=threads, n_threads_batch=threads,
                         n_ctx=context, n_batch=batch, verbose=False)

    def prefill(self, ids: list[int]) -> None:
        self.llm.reset()
        self.llm.eval(ids)
        self.next = int(np.argmax(self.llm.scores[self.llm.n_tokens - 1]))

    def decode(self, steps: int) -> None:
        for _ in range(steps):
            self.llm.eval([self.next])
            self.next = int(np.argmax(self.llm.scores[self.llm.n_tokens - 1]))
