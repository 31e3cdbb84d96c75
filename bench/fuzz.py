"""Fuzz proof (issue 11): schemathesis against the live OpenAPI spec of a real deployment.

A redis-server, a `hypersd worker` (the 1-step Shapes model: fuzzed jobs end in a moment, so the
synchronous routes answer instead of timing out) and `hypersd serve`; schemathesis then reads
`/openapi.json` from the running gateway and sends generated requests (valid and invalid) to every
operation, in all its phases (examples, coverage, fuzzing, stateful: POST then GET, cancel,
images, events through the `Location` links). Checks: no 5xx, every status code, content type,
header and body as the spec declares. Prints a table of the requests by status code and exits
non-zero on any failure.

    .venv/bin/python -m bench.fuzz --max-examples 200     # make fuzz: >= 2,000 requests
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from collections import Counter
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

from bench.machine import describe_machine
from bench.processes import (
    free_port,
    gateway,
    hypersd_env,
    live_workers,
    redis_server,
    wait_until,
    worker,
)

MODEL = "shapes-hyper-1step"
CHECKS = ",".join(
    [
        "not_a_server_error",
        "status_code_conformance",
        "content_type_conformance",
        "response_headers_conformance",
        "response_schema_conformance",
    ]
)


@dataclass
class FuzzResult:
    """What a run found: its exit code, requests by status code, and schemathesis' output."""

    returncode: int
    statuses: Counter[int]
    output: str

    @property
    def requests(self) -> int:
        return sum(self.statuses.values())

    def table(self) -> str:
        rows = ["| status | requests |", "|---:|---:|"]
        rows += [f"| {status} | {count} |" for status, count in sorted(self.statuses.items())]
        rows.append(f"| **all** | **{self.requests}** |")
        return "\n".join(rows)


def fuzz(max_examples: int, seed: int, folder: Path) -> FuzzResult:
    """Start the deployment in `folder`, run schemathesis against it, stop everything.

    Args:
        max_examples: Test cases per operation and phase (schemathesis' `-n`).
        seed: schemathesis' seed: the same seed, the same requests.
        folder: Logs, Redis' data and the HAR report of every request.
    """
    with ExitStack() as stack:
        port = free_port()
        stack.callback(redis_server(folder, port).stop)
        env = hypersd_env(f"redis://127.0.0.1:{port}/0", [MODEL], slots=4, max_batch_size=8)
        stack.callback(worker(env, MODEL, folder / "worker.log").stop)
        proc, url = gateway(env, folder / "gateway.log")
        stack.callback(proc.stop)
        wait_until(lambda: live_workers(url, MODEL) > 0, 180, "the worker")
        har = folder / "requests.har"
        command = [
            str(Path(sys.executable).parent / "schemathesis"),
            "run",
            f"{url}/openapi.json",
            f"--checks={CHECKS}",
            f"--max-examples={max_examples}",
            f"--seed={seed}",
            "--request-timeout=90",
            "--generation-database=none",
            "--suppress-health-check=all",
            "--no-color",
            "--workers=2",
            "--report=har",
            f"--report-har-path={har}",
        ]
        # run in `folder`: schemathesis keeps a cache (.schemathesis/) in its working directory
        done = subprocess.run(command, cwd=folder, capture_output=True, text=True, check=False)
        statuses: Counter[int] = Counter()
        if har.exists():
            for entry in json.loads(har.read_text())["log"]["entries"]:
                statuses[int(entry["response"]["status"])] += 1
        if not proc.alive():
            return FuzzResult(1, statuses, done.stdout + "\nthe gateway died")
        return FuzzResult(done.returncode, statuses, done.stdout + done.stderr)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--max-examples", type=int, default=200, help="schemathesis' -n")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", type=Path, help="also write the report (markdown) here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="hypersd-fuzz-") as folder:
        result = fuzz(args.max_examples, args.seed, Path(folder))
    summary = result.output.strip().splitlines()[-1] if result.output.strip() else ""
    verdict = "passed" if result.returncode == 0 else "FAILED"
    report = (
        f"schemathesis, `-n {args.max_examples} --seed {args.seed}`, checks {CHECKS}: "
        f"**{verdict}** ({summary.strip('= ')})\n\n{result.table()}\n\n{describe_machine()}\n"
    )
    if result.returncode != 0:
        print(result.output)
    print(report)
    if args.out is not None:
        args.out.write_text(report)
    sys.exit(result.returncode)


if __name__ == "__main__":
    main()
