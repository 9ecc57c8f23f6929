"""`continuity config example|check`: print a complete example config, or check and resolve one.

`check` loads a file exactly as `serve`, `replay` and `demo` do (with the same `--set`
overrides and environment-supplied secrets), builds the model once abstractly and the
optimizer (continuity/factory.py `check`), and prints what they would run with, secrets
shown as '***', so a config can be validated before a deployment starts.
"""

from __future__ import annotations

import json
import sys


def register(subparsers) -> None:
    from continuity.config import add_config_arguments

    group = subparsers.add_parser("config", help="print an example config, or check one")
    commands = group.add_subparsers(dest="config_command", metavar="COMMAND", parser_class=type(group))
    commands.required = True

    example = commands.add_parser("example", help="a complete, commented config with every key at its default")
    example.set_defaults(handler=run_example)

    check = commands.add_parser("check", help="load and validate a config; print it resolved (secrets as ***)")
    add_config_arguments(check)
    check.add_argument("--json", action="store_true", help="print JSON instead of TOML")
    check.set_defaults(handler=run_check)


def run_example(args) -> int:
    from continuity.config import example_config

    sys.stdout.write(example_config())
    return 0


def run_check(args) -> int:
    from continuity.config import config_from_args

    config = config_from_args(args)
    from continuity.factory import check  # JAX: only once the file itself is valid

    check(config)  # the model builds (abstractly), optax has the optimizer, the codec carries the labels
    if args.json:
        print(json.dumps({"source_path": config.source_path, "digest": config.digest(), **config.to_dict()}, indent=2))
    else:
        sys.stdout.write(config.to_toml())
    return 0
