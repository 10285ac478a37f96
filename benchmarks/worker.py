"""``python -m benchmarks.worker``: one interpreter's share of a per-commit workload.

Usage: ``python -m benchmarks.worker {commit,flask,async} DATABASE {full,quick} ROUNDS``.
Prints ``{"ops": N, "samples": {variant: [ns per commit, ...]}}`` as JSON;
:func:`benchmarks.harness.pooled` runs it and pools the samples.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Callable, Sequence

from .async_commit import async_samples
from .flask_signal import flask_samples
from .harness import FULL, QUICK, Samples, Settings
from .workloads import commit_samples

SAMPLERS: dict[str, Callable[[str, Settings], tuple[Samples, int]]] = {
    "commit": commit_samples,
    "flask": flask_samples,
    "async": async_samples,
}


def main(argv: Sequence[str]) -> int:
    """Run the rounds named by *argv* and print their samples; 2 on a usage error."""
    if len(argv) != 4 or argv[0] not in SAMPLERS or argv[2] not in ("full", "quick"):
        print(__doc__, file=sys.stderr)
        return 2
    sampler, database, mode, rounds = argv
    base = QUICK if mode == "quick" else FULL
    settings = dataclasses.replace(base, rounds=int(rounds), processes=1)
    samples, ops = SAMPLERS[sampler](database, settings)
    json.dump({"ops": ops, "samples": samples}, sys.stdout)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
