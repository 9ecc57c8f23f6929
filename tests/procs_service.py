"""One of several `continuity serve` processes (jax.distributed over gloo) run as a Service until its
stream is idle; the parent (tests/test_procs.py) starts them.

`python tests/procs_service.py PORT PROCESS PROCESSES BOOTSTRAP TOPIC DIR [SETTING ...]` (SETTINGs as
--set takes them) prints JSON: {"process", "summary" (the RunSummary), "digest" (the final model's
params), "http" (with service.http_port set: what its own endpoints answered once up, by request)}.
A peer that dies ends it as it ends `serve`: one line and exit status 6, nothing saved.

With $HANG_LEDGER_AT set to PROCESS:EVENT (e.g. "1:probe"), that process's ledger hangs at the first
write of EVENT, as on a hung disk: its main thread blocks for ever while JAX's heartbeats go on.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
import threading
import urllib.error
import urllib.request

from continuity.config import load_config
from continuity.processes import PeerLost, exit_on_peer_lost, join


def settings(bootstrap: str, topic: str, directory: str) -> list[str]:
    """The service's config (as --set overrides): ids as features, every window accepted and checkpointed."""
    return [
        f'stream.bootstrap="{bootstrap}"',
        f'stream.topics=["{topic}"]',
        'stream.codec="binary"',
        "stream.feature_shape=[2]",
        "stream.num_classes=10",
        "model.hidden=[16]",
        "learner.batch_size=16",
        "learner.steps_per_dispatch=2",
        "probe.every_examples=120",
        "probe.enabled=false",
        "checkpoints.every_seconds=0",
        f'checkpoints.dir="{directory}"',
    ]


def main() -> None:
    port, process, processes = (int(a) for a in sys.argv[1:4])
    bootstrap, topic, directory = sys.argv[4:7]
    config = load_config(
        None,
        [
            *settings(bootstrap, topic, directory),
            f"scale.num_processes={processes}",
            f'scale.coordinator="127.0.0.1:{port}"',
            f"scale.process_id={process}",
            *sys.argv[7:],
        ],
    )
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    join(config.scale, timeout_s=120)
    from continuity.loop import params_digest
    from continuity.service import Service

    hang_process, _, hang_event = os.environ.get("HANG_LEDGER_AT", "").partition(":")
    if hang_process == str(process):
        _hang_ledger_at(hang_event)
    http = any(s.startswith("service.http_port=") for s in sys.argv[7:])
    service = Service(config, idle_timeout_s=2.0, http=http)  # every record is produced before it starts
    answers: dict[str, tuple[int, str]] = {}
    try:
        summary = service.run(lambda url: answers.update(_ask(url)))
    except PeerLost as error:
        exit_on_peer_lost(error)
    report = {
        "process": process,
        "summary": dataclasses.asdict(summary),
        "digest": params_digest(service.loop.final_state),
        "devices": service.learner.placement.count,  # the mesh's, over every process
        "http": answers,
    }
    print(json.dumps(report, default=str), flush=True)


def _hang_ledger_at(event: str) -> None:
    from continuity.checkpoints.ledger import Ledger

    append = Ledger.append

    def hanging(self, name, **fields):
        if name == event:
            print(f"hanging at the ledger's {event!r}", file=sys.stderr, flush=True)
            threading.Event().wait()
        return append(self, name, **fields)

    Ledger.append = hanging  # type: ignore[method-assign]


def _ask(url: str) -> dict[str, tuple[int, str]]:
    """What this process's endpoints answer: {"GET /healthz": (status, body), ...}."""
    answers = {}
    for method, path in [
        ("GET", "/healthz"),
        ("GET", "/metrics"),
        ("GET", "/status"),
        ("POST", "/admin/checkpoint"),
        ("POST", "/predict"),
    ]:
        request = urllib.request.Request(url + path, method=method, data=b"{}" if method == "POST" else None)
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                answers[f"{method} {path}"] = (response.status, response.read().decode())
        except urllib.error.HTTPError as error:
            answers[f"{method} {path}"] = (error.code, error.read().decode())
    return answers


if __name__ == "__main__":
    main()
