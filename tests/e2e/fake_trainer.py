"""TEST DOUBLE of the trainer, for operator e2e tests that exercise the Job lifecycle, not training.

The operator runs it through its KUBETUNE_TRAINER_COMMAND setting (a test-only hook). It reads the
same `--config` file as the real trainer and follows the exit-code and termination-message
contract, driven by environment variables a test puts in the FineTuneJob's spec.env:

    FAKE_WAIT_FOR   a path, or an http:// URL: block until the path exists or the URL answers 200
                    (bounded), so a test can act mid-run
    FAKE_STARTED    a path: append one line per start; or an http:// URL: POST to it once per start
                    (counts attempts)

URLs work from any node: a real node's pods do not see the host's files (tests.support.jobs.Signals
serves them).
    FAKE_EXIT_CODE  exit code (default 0)
    FAKE_MESSAGE    error message for the termination message when exiting non-zero
    FAKE_EVALUATION JSON of the summary's evaluation (metrics tuned vs base) on success
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import yaml


def is_url(value: str) -> bool:
    return value.startswith(("http://", "https://"))


def released(gate: str) -> bool:
    if not is_url(gate):
        return Path(gate).exists()
    try:
        with urllib.request.urlopen(gate, timeout=5) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", required=True)
    config = yaml.safe_load(Path(parser.parse_args().config).read_text())
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    started = os.environ.get("FAKE_STARTED")
    if started and is_url(started):
        urllib.request.urlopen(urllib.request.Request(started, data=b"", method="POST"), timeout=10).close()
    elif started:
        with open(started, "a") as f:
            f.write(f"{os.getpid()}\n")
    wait_for = os.environ.get("FAKE_WAIT_FOR")
    deadline = time.monotonic() + 300
    while wait_for and not released(wait_for) and time.monotonic() < deadline:
        time.sleep(0.1)
    code = int(os.environ.get("FAKE_EXIT_CODE", "0"))
    log = Path(os.environ.get("KUBETUNE_TERMINATION_LOG", "/dev/termination-log"))
    if code:
        summary = {"error": os.environ.get("FAKE_MESSAGE", "fake failure"), "exitCode": code}
    else:
        steps = config.get("training", {}).get("maxSteps") or 10
        location = f"{config['output']['location'].rstrip('/')}/{config['runName']}/"
        summary = {"step": steps, "totalSteps": steps, "epoch": 1.0,
                   "metrics": {"trainLoss": 0.25, "evalLoss": 0.5, "perplexity": 1.65},
                   "artifacts": {"location": location, "adapter": f"{location}adapter/",
                                 "manifest": f"{location}manifest.json", "files": 3, "totalBytes": 1000}}
        if os.environ.get("FAKE_EVALUATION"):
            summary["evaluation"] = json.loads(os.environ["FAKE_EVALUATION"])
    log.write_text(json.dumps(summary))
    print(json.dumps({"event": "done", "exitCode": code}), flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
