"""`kubetune watch NAME` and `kubetune describe NAME`: a FineTuneJob followed from the terminal.

``watch`` follows the job through the API server's watch: on a terminal, a live progress bar (rich)
with step/total, loss, eval loss, tokens/s, ETA and the phase; phase changes are printed above it
as they happen. Elsewhere (a pipe, CI logs) it prints plain lines: one per phase change and one per
reported step. It ends when the job does: exit 0 Succeeded, 1 Failed (or not found), 2 timed out.

``describe`` prints the job as ``kubectl describe`` would, with KubeTune's own parts: conditions,
progress, metrics, evaluation, artifacts (the OCI digest too), lineage and recent events.

Both also run as a kubectl plugin (``kubectl kubetune watch NAME``): the package installs
``kubectl-kubetune``.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, TextIO

Json = dict[str, Any]
TERMINAL = ("Succeeded", "Failed")


def add_parsers(sub: Any) -> None:
    watch = sub.add_parser("watch", help="follow a FineTuneJob: a live progress bar (plain lines when not a "
                                         "terminal) until it ends; exit 0 Succeeded, 1 Failed")
    watch.add_argument("name", help="the FineTuneJob")
    watch.add_argument("-n", "--namespace", default=None, help="its namespace (default: the kubeconfig's)")
    watch.add_argument("--timeout", type=float, default=None, help="give up after this many seconds (exit 2)")
    describe = sub.add_parser("describe", help="show a FineTuneJob: conditions, progress, metrics, evaluation, "
                                               "artifacts, lineage and events")
    describe.add_argument("name", help="the FineTuneJob")
    describe.add_argument("-n", "--namespace", default=None, help="its namespace (default: the kubeconfig's)")
    logs = sub.add_parser("logs", help="a FineTuneJob's trainer log: its newest pod's, followed across restarts "
                                       "with -f; once the pods are gone, the copy published with its outputs")
    logs.add_argument("name", help="the FineTuneJob")
    logs.add_argument("-n", "--namespace", default=None, help="its namespace (default: the kubeconfig's)")
    logs.add_argument("-f", "--follow", action="store_true", help="follow until the job ends, through pod restarts")
    which = logs.add_mutually_exclusive_group()
    which.add_argument("--rank", type=int, default=0, help="the pod of this node rank (distribution.nodes; "
                                                          "default 0, the one that reports and publishes)")
    which.add_argument("--all", action="store_true", help="every node's pod, each line prefixed with its rank")
    logs.add_argument("--endpoint", help="object-store endpoint as seen from here, for the published copy")
    logs.add_argument("--insecure", action="store_true", default=None, help="plain HTTP to the endpoint")


@dataclass
class Shown:
    """What one status says, as the watch shows it."""

    phase: str
    reason: str
    message: str
    step: int | None
    total: int | None
    line: str  # loss, eval loss, tokens/s, ETA

    @classmethod
    def of(cls, ftj: Json) -> Shown:
        status = ftj.get("status") or {}
        progress, metrics = status.get("progress") or {}, status.get("metrics") or {}
        parts = []
        for key, label, fmt in (("trainLoss", "loss", "{:.4f}"), ("evalLoss", "eval", "{:.4f}"),
                                ("tokensPerSecond", "tok/s", "{:.0f}")):
            if metrics.get(key) is not None:
                parts.append(f"{label} {fmt.format(metrics[key])}")
        if progress.get("etaSeconds") is not None and status.get("phase") == "Running":
            parts.append(f"eta {duration(int(progress['etaSeconds']))}")
        return cls(str(status.get("phase") or "Pending"), str(status.get("reason") or ""),
                   str(status.get("message") or ""), progress.get("step"), progress.get("totalSteps"),
                   "  ".join(parts))

    def phase_line(self) -> str:
        return f"{self.phase}" + (f" ({self.reason})" if self.reason and self.reason != self.phase else "") + (
            f": {self.message}" if self.message else "")

    def step_line(self) -> str:
        total = f"/{self.total}" if self.total else ""
        percent = f" ({100 * self.step // self.total}%)" if self.total and self.step is not None else ""
        return f"step {self.step}{total}{percent}" + (f"  {self.line}" if self.line else "")


def duration(seconds: int) -> str:
    hours, rest = divmod(max(seconds, 0), 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def stream(kube: Any, namespace: str, name: str, deadline: float | None) -> Iterator[Json | None]:
    """The FineTuneJob as it changes (the API server's watch, resumed where it broke off); None when
    it does not exist (or was deleted)."""
    from kubernetes import watch

    from kubetune import api

    first = kube.get_finetunejob(namespace, name)
    yield first
    if first is None:
        return
    version = first["metadata"].get("resourceVersion")
    while deadline is None or time.monotonic() < deadline:
        left = 60 if deadline is None else max(1, min(60, int(deadline - time.monotonic())))
        watcher = watch.Watch()  # type: ignore[no-untyped-call]
        try:
            for event in watcher.stream(  # type: ignore[no-untyped-call]
                    kube.custom.list_namespaced_custom_object, api.GROUP, api.VERSION, namespace, api.PLURAL,
                    field_selector=f"metadata.name={name}", resource_version=version, timeout_seconds=left):
                obj = event["object"]
                version = obj.get("metadata", {}).get("resourceVersion", version)
                yield None if event["type"] == "DELETED" else obj
        except Exception as err:  # 410 Gone (too old) or a broken connection: read afresh
            if getattr(err, "status", None) not in (410, None):
                raise
            again = kube.get_finetunejob(namespace, name)
            yield again
            if again is None:
                return
            version = again["metadata"].get("resourceVersion")
        finally:
            watcher.stop()  # type: ignore[no-untyped-call]


def watch_job(updates: Iterator[Json | None], out: TextIO, tty: bool) -> int:
    """Show `updates` until the job ends: 0 Succeeded, 1 Failed or gone, 2 the updates stopped."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    console = Console(file=out, force_terminal=tty, force_interactive=tty, highlight=False,
                      width=None if tty else 200)
    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("{task.fields[line]}"), console=console, transient=False) if tty else None
    task = None
    last: Shown | None = None
    if progress is not None:
        progress.start()
    try:
        for ftj in updates:
            if ftj is None:
                console.print("the FineTuneJob does not exist (or was deleted)")
                return 1
            shown = Shown.of(ftj)
            if last is None or (shown.phase, shown.reason) != (last.phase, last.reason):
                console.print(f"{time.strftime('%H:%M:%S')} {shown.phase_line()}")
            if progress is not None:
                if task is None and shown.total:
                    task = progress.add_task(shown.phase, total=shown.total, line="")
                if task is not None:
                    progress.update(task, completed=shown.step or 0, total=shown.total, description=shown.phase,
                                    line=shown.line)
            elif shown.step is not None and (last is None or shown.step != last.step):
                console.print(shown.step_line())
            last = shown
            if shown.phase in TERMINAL:
                if progress is not None:
                    progress.stop()
                    progress = None
                for text in summary(ftj):
                    console.print(text, soft_wrap=True)  # a reference to copy stays on one line
                return 0 if shown.phase == "Succeeded" else 1
        return 2
    finally:
        if progress is not None:
            progress.stop()


def summary(ftj: Json) -> list[str]:
    status = ftj.get("status") or {}
    lines = []
    if status.get("metrics"):
        metrics = status["metrics"]
        lines.append("metrics: " + ", ".join(f"{k} {v}" for k, v in metrics.items() if not isinstance(v, dict)))
    if (status.get("evaluation") or {}).get("headline"):
        lines.append(f"evaluation: {status['evaluation']['headline']}")
    artifacts = status.get("artifacts") or {}
    if artifacts.get("location"):
        lines.append(f"artifacts: {artifacts['location']}")
    if artifacts.get("ociReference"):
        lines.append(f"oci: {artifacts['ociReference']}")
    return lines


def describe(ftj: Json, events: list[Json]) -> str:
    """kubectl-describe-like text of a FineTuneJob and its events."""
    import yaml

    meta, spec, status = ftj["metadata"], ftj.get("spec") or {}, ftj.get("status") or {}
    phase, reason = status.get("phase") or "Pending", status.get("reason") or ""
    out = [f"Name:         {meta['name']}", f"Namespace:    {meta['namespace']}",
           f"Created:      {meta.get('creationTimestamp', '')}",
           f"Backbone:     {(spec.get('model') or {}).get('source', '')}",
           f"Method:       {(spec.get('training') or {}).get('method', 'sft')}",
           f"Phase:        {phase}" + (f" ({reason})" if reason and reason != phase else ""),
           f"Message:      {status.get('message', '')}",
           f"Attempts:     {status.get('attempts', 0)}"]
    if status.get("startTime"):
        out.append(f"Started:      {status['startTime']}")
    if status.get("completionTime"):
        out.append(f"Completed:    {status['completionTime']}")
    conditions = status.get("conditions") or []
    if conditions:
        out += ["Conditions:", f"  {'Type':<12} {'Status':<7} {'Reason':<24} Message"]
        out += [f"  {c.get('type', ''):<12} {c.get('status', ''):<7} {c.get('reason', ''):<24} {c.get('message', '')}"
                for c in conditions]
    for title, key in (("Progress", "progress"), ("Metrics", "metrics"), ("Dataset", "dataset"),
                       ("Evaluation", "evaluation"), ("Artifacts", "artifacts")):
        if status.get(key):
            block = yaml.safe_dump(status[key], sort_keys=False, width=200).rstrip()
            out += [f"{title}:", *("  " + line for line in block.splitlines())]
    out.append("Events:")
    if not events:
        out.append("  <none>")
    for event in events[-20:]:
        when = event.get("lastTimestamp") or event.get("eventTime") or event.get("firstTimestamp") or ""
        count = f" (x{event['count']})" if (event.get("count") or 1) > 1 else ""
        out.append(f"  {when:<21} {event.get('type', ''):<8} {event.get('reason', ''):<18} "
                   f"{event.get('message', '')}{count}")
    return "\n".join(out)


def job_events(kube: Any, namespace: str, ftj: Json) -> list[Json]:
    found = kube.core.list_namespaced_event(
        namespace, field_selector=f"involvedObject.uid={ftj['metadata']['uid']}", _request_timeout=kube.timeout)
    items = [kube.core.api_client.sanitize_for_serialization(e) for e in found.items]
    return sorted(items, key=lambda e: e.get("lastTimestamp") or e.get("eventTime") or e.get("firstTimestamp") or "")


INDEX = "batch.kubernetes.io/job-completion-index"


def newest_pods(pods: list[Json]) -> dict[int, Json]:
    """The newest pod of each node rank (an Indexed Job's completion index; 0 for one pod)."""
    out: dict[int, Json] = {}
    for pod in sorted(pods, key=lambda p: p["metadata"].get("creationTimestamp") or ""):
        out[int((pod["metadata"].get("annotations") or {}).get(INDEX, "0"))] = pod
    return out


def training_pods(kube: Any, namespace: str, name: str) -> list[Json]:
    from kubetune.render import job_name

    found = kube.core.list_namespaced_pod(namespace, label_selector=f"batch.kubernetes.io/job-name={job_name(name)}",
                                          _request_timeout=kube.timeout)
    return [kube.core.api_client.sanitize_for_serialization(p) for p in found.items]


def logs(kube: Any, namespace: str, ftj: Json, args: argparse.Namespace, out: TextIO) -> int:
    """Print the trainer log of the newest pod of each wanted rank; with `follow`, stream them (one
    thread per pod) and, when a restart replaces them, the next ones, until the job ends. With no
    pod left (removed after the end), the copy published with the outputs. 1 when there is none."""
    import threading

    name = ftj["metadata"]["name"]
    shown: set[str] = set()  # pods whose log was printed: a restart's new pods come next
    lock = threading.Lock()
    while True:
        pods = newest_pods(training_pods(kube, namespace, name))
        phase = ((kube.get_finetunejob(namespace, name) or {}).get("status") or {}).get("phase")
        if not pods and not shown and (not args.follow or phase in TERMINAL):
            return published_log(kube, namespace, ftj, args, out)
        wanted = sorted(pods.items()) if args.all else [(args.rank, pods[args.rank])] if args.rank in pods else []
        fresh = [(rank, pod) for rank, pod in wanted if pod["metadata"]["uid"] not in shown
                 and (pod.get("status") or {}).get("startTime")]
        threads = [threading.Thread(target=print_log, args=(kube, namespace, pod, f"[rank {rank}] " if args.all else "",
                                                            out, args.follow, lock), daemon=True)
                   for rank, pod in fresh]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        shown.update(pod["metadata"]["uid"] for _, pod in fresh)
        if not args.follow:
            return 0 if shown else 1
        if phase in TERMINAL or kube.get_finetunejob(namespace, name) is None:
            return 0
        time.sleep(1)  # the job goes on: its next pods (a restart) may not exist yet


def print_log(kube: Any, namespace: str, pod: Json, prefix: str, out: TextIO, follow: bool,
              lock: Any = None) -> None:
    """One pod's trainer log (followed until the container ends), each line whole and prefixed."""
    import contextlib

    from kubernetes.client.exceptions import ApiException

    try:
        response = kube.core.read_namespaced_pod_log(pod["metadata"]["name"], namespace, container="trainer",
                                                     follow=follow, _preload_content=False,
                                                     _request_timeout=None if follow else kube.timeout)
    except ApiException as err:
        if err.status in (400, 404):  # not started, or gone meanwhile
            return
        raise
    pending = ""
    for chunk in response.stream(decode_content=True) if follow else [response.data]:
        pending += chunk.decode(errors="replace") if isinstance(chunk, bytes) else str(chunk)
        *lines, pending = pending.split("\n")
        with lock if lock is not None else contextlib.nullcontext():
            out.writelines(prefix + line + "\n" for line in lines)
            out.flush()
    if pending:
        with lock if lock is not None else contextlib.nullcontext():
            out.write(prefix + pending + "\n")
            out.flush()


def published_log(kube: Any, namespace: str, ftj: Json, args: argparse.Namespace, out: TextIO) -> int:
    """The trainer.log published with the outputs, once no pod is left."""
    import tempfile
    from pathlib import Path

    from kubetune.pull import credentials, storage_of
    from kubetune_trainer.artifacts import open_run

    location = str(((ftj.get("status") or {}).get("artifacts") or {}).get("location") or "").rstrip("/")
    if not location:
        print(f"FineTuneJob {namespace}/{ftj['metadata']['name']} has no pods and published no log", file=sys.stderr)
        return 1
    if location.startswith("s3://"):
        credentials(kube, namespace, ftj)
    store = open_run(location, storage_of(ftj, args.endpoint, args.insecure))
    if "trainer.log" not in store.list("trainer.log"):
        print(f"{location} holds no trainer.log", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory() as tmp:
        store.get_file("trainer.log", Path(tmp) / "trainer.log")
        print(f"# the pods are gone: the log published with {location}/trainer.log", file=sys.stderr)
        out.write((Path(tmp) / "trainer.log").read_text(errors="replace"))
    return 0


def command(args: argparse.Namespace) -> int:
    from kubetune.pull import PullError, connect

    kube, namespace = connect(args.namespace)
    if args.command == "logs":
        ftj = kube.get_finetunejob(namespace, args.name)
        if ftj is None:
            print(f"FineTuneJob {namespace}/{args.name} not found", file=sys.stderr)
            return 1
        try:
            return logs(kube, namespace, ftj, args, sys.stdout)
        except PullError as err:
            print(f"kubetune logs: {err}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            return 130
    if args.command == "describe":
        ftj = kube.get_finetunejob(namespace, args.name)
        if ftj is None:
            print(f"FineTuneJob {namespace}/{args.name} not found", file=sys.stderr)
            return 1
        print(describe(ftj, job_events(kube, namespace, ftj)))
        return 0
    deadline = time.monotonic() + args.timeout if args.timeout else None
    try:
        return watch_job(stream(kube, namespace, args.name, deadline), sys.stdout, sys.stdout.isatty())
    except KeyboardInterrupt:
        return 130
