"""One of several `continuity serve` processes (jax.distributed over gloo) run as a Service until its
stream is idle; the parent (tests/test_procs.py) starts them.

`python tests/procs_service.py PORT PROCESS PROCESSES BOOTSTRAP TOPIC DIR` prints JSON: {"process",
"summary" (the RunSummary), "digest" (the final model's params)}.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys

from continuity.config import load_config
from continuity.processes import join


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
        ],
    )
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    join(config.scale, timeout_s=120)
    from continuity.loop import params_digest
    from continuity.service import Service

    service = Service(config, idle_timeout_s=4.0, http=False)
    summary = service.run()
    report = {
        "process": process,
        "summary": dataclasses.asdict(summary),
        "digest": params_digest(service.loop.final_state),
    }
    print(json.dumps(report, default=str), flush=True)


if __name__ == "__main__":
    main()
