"""Fuzz the safetensors header reader: `python benchmarks/fuzz_reader.py --cases 10000`.

Runs the suite's two properties (tests/fuzz_safetensors.py: structure-aware header
mutations and byte-level mutations) with many more examples than CI can afford, and
prints cases per second and how often each outcome occurred. Any exception other than
CheckpointError, or a case slower than the deadline, fails the run (exit code 1).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from hypothesis import HealthCheck, given, settings

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.fuzz_safetensors import check_reader, mutated_bytes, mutated_headers


def run(strategy, cases: int, folder: Path, outcomes: Counter) -> None:
    @settings(
        max_examples=cases, deadline=2000, database=None, suppress_health_check=list(HealthCheck)
    )
    @given(raw=strategy)
    def prop(raw: bytes) -> None:
        outcomes[check_reader(raw, folder / "fuzz.safetensors")] += 1

    prop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=10000, help="examples per property")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        for label, strategy in (
            ("header mutations", mutated_headers()),
            ("byte mutations", mutated_bytes()),
        ):
            outcomes: Counter = Counter()
            start = time.perf_counter()
            run(strategy, args.cases, Path(tmp), outcomes)
            seconds = time.perf_counter() - start
            total = sum(outcomes.values())
            print(
                f"{label}: {total} cases in {seconds:.1f} s ({total / seconds:.0f}/s), "
                "no exception but CheckpointError"
            )
            for outcome, count in outcomes.most_common(12):
                print(f"  {count:6d}  {outcome}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
