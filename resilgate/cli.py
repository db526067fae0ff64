"""The ``resilgate`` command line: serve, check, demo, simulate, mode, journal."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from resilgate.config import Config, ConfigError, load_config
from resilgate.simulators import SIMULATOR_KINDS, SITES, SimulatorOptions, run_simulator

EXIT_CONFIG = 2


def _load(path: Path) -> Config | None:
    try:
        return load_config(path)
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"error: {problem}", file=sys.stderr)
        return None


def _workers(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError("workers is 0 (one per core) or more")
    return value


def _check(args: argparse.Namespace) -> int:
    config = _load(args.config)
    if config is None:
        return EXIT_CONFIG
    if config.state.backend == "memory":
        print(f"warning: {args.config}: state.backend: memory is for tests only", file=sys.stderr)
    endpoints = sum(len(upstream.endpoints) for upstream in config.upstreams.values())
    print(
        f"{args.config}: ok ({len(config.upstreams)} upstreams, {endpoints} endpoints, "
        f"{len(config.routes)} routes)"
    )
    return 0


def _serve(args: argparse.Namespace) -> int:
    from resilgate.workers import serve

    config = _load(args.config)
    if config is None:
        return EXIT_CONFIG
    return serve(config, args.workers, args.ready_file)


def _demo(args: argparse.Namespace) -> int:
    from resilgate.demo import run_demo

    config = _load(args.config)
    if config is None:
        return EXIT_CONFIG
    return run_demo(config, args.port, args.ephemeral, args.workers, args.ready_file)


def _mode(args: argparse.Namespace) -> int:
    from resilgate.mode_cli import clear_mode, list_modes, run_mode, set_mode

    config = _load(args.config)
    if config is None:
        return EXIT_CONFIG
    if args.action == "set":
        action = set_mode(args.target, args.mode, args.reason, args.actor, args.expires_in)
    elif args.action == "clear":
        action = clear_mode(args.target, args.reason, args.actor)
    else:
        action = list_modes()
    return run_mode(config, action)


def _journal(args: argparse.Namespace) -> int:
    from resilgate.journal_cli import list_entries, run_journal, show_entry

    config = _load(args.config)
    if config is None:
        return EXIT_CONFIG
    if args.action == "show":
        action = show_entry(args.ticket)
    else:
        action = list_entries(args.state, args.queue, args.limit)
    return run_journal(config, action)


def _simulate(args: argparse.Namespace) -> int:
    options = SimulatorOptions(kind=args.kind, site=args.site, seed=args.seed)
    run_simulator(options, args.host, args.port, args.ready_file)
    return 0


def _add_journal(verbs: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    journal = verbs.add_parser("journal", help="list and show journaled writes and dead letters")
    journal.add_argument(
        "--config", type=Path, default=Path("resilgate.yaml"), help="main config file"
    )
    entries = journal.add_subparsers(dest="action", required=True)
    listing = entries.add_parser("list", help="one line per entry, in acceptance order")
    listing.add_argument(
        "--state",
        choices=["dead", "open", "all"],
        default="all",
        help="dead: conflicts and failures for a person; open: not replayed yet",
    )
    listing.add_argument("--queue", help="only this queue (an upstream's name)")
    listing.add_argument("--limit", type=int, default=1000, help="at most this many entries")
    show = entries.add_parser("show", help="one entry's state and the upstream's answer")
    show.add_argument("ticket")
    for action in (listing, show):  # --config is also taken after the action
        action.add_argument(
            "--config", type=Path, default=argparse.SUPPRESS, help="main config file"
        )
    journal.set_defaults(run=_journal)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="resilgate", description=__doc__)
    verbs = parser.add_subparsers(dest="verb", required=True)

    def config_option(verb: argparse.ArgumentParser) -> None:
        verb.add_argument(
            "--config", type=Path, default=Path("resilgate.yaml"), help="main config file"
        )

    def ready_option(verb: argparse.ArgumentParser) -> None:
        verb.add_argument(
            "--ready-file", type=Path, help="write the bound ports here as JSON once listening"
        )

    serve = verbs.add_parser("serve", help="run the gateway")
    config_option(serve)
    serve.add_argument(
        "--workers", type=_workers, help="worker processes (default: config, or cores)"
    )
    ready_option(serve)
    serve.set_defaults(run=_serve)

    check = verbs.add_parser("check", help="validate the configuration; exit 2 on error")
    config_option(check)
    check.set_defaults(run=_check)

    demo = verbs.add_parser("demo", help="simulated upstreams plus the gateway")
    config_option(demo)
    demo.add_argument("--port", type=int, help="gateway port (default: the config's)")
    demo.add_argument("--workers", type=_workers, help="gateway worker processes")
    demo.add_argument(
        "--ephemeral", action="store_true", help="free ports for everything (for tests)"
    )
    ready_option(demo)
    demo.set_defaults(run=_demo)

    from resilgate.mode_cli import default_actor

    mode = verbs.add_parser("mode", help="force, clear or list modes in the state store")
    config_option(mode)
    actions = mode.add_subparsers(dest="action", required=True)
    force = actions.add_parser("set", help="force an upstream, route or endpoint into a mode")
    force.add_argument("target", help="upstream, route, or endpoint as upstream/endpoint (a fence)")
    force.add_argument("mode", choices=["primary", "dr", "fallback", "maintenance"])
    force.add_argument("--reason", required=True, help="why (kept in the audit log)")
    force.add_argument("--expires-in", type=float, help="seconds until auto returns")
    force.add_argument("--actor", default=default_actor(), help="who (default: cli:<user>)")
    clear = actions.add_parser("clear", help="back to auto")
    clear.add_argument("target")
    clear.add_argument("--reason", required=True)
    clear.add_argument("--actor", default=default_actor())
    actions.add_parser("list", help="modes in force")
    mode.set_defaults(run=_mode)

    _add_journal(verbs)

    simulate = verbs.add_parser("simulate", help="run one simulated hospital upstream")
    simulate.add_argument("kind", choices=SIMULATOR_KINDS)
    simulate.add_argument("--host", default="127.0.0.1")
    simulate.add_argument("--port", type=int, required=True, help="0 picks a free port")
    simulate.add_argument("--site", choices=SITES, default="primary")
    simulate.add_argument("--seed", type=int, default=20250320, help="seed of the fake data")
    ready_option(simulate)
    simulate.set_defaults(run=_simulate)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    code: int = args.run(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
