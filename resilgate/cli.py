"""The ``resilgate`` command line: serve, check, demo, simulate; the admin API's verbs (status,
mode, journal, drill); token."""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path

from resilgate import admin_client as api
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
    from resilgate.admin.auth import TokenBook
    from resilgate.errors import StartupError

    try:
        tokens = TokenBook.from_config(config)
    except StartupError as exc:
        print(f"error: {args.config}: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    if not len(tokens):
        print(
            f"warning: {args.config}: admin.tokens: none, so the admin API answers only "
            "/healthz, /readyz and /openapi.json",
            file=sys.stderr,
        )
    endpoints = sum(len(upstream.endpoints) for upstream in config.upstreams.values())
    print(
        f"{args.config}: ok ({len(config.upstreams)} upstreams, {endpoints} endpoints, "
        f"{len(config.routes)} routes)"
    )
    return 0


def _serve(args: argparse.Namespace) -> int:
    from resilgate import metrics_dir

    metrics_dir.prepare()  # before the gateway's modules import prometheus_client
    from resilgate.workers import serve

    config = _load(args.config)
    if config is None:
        return EXIT_CONFIG
    return serve(config, args.workers, args.ready_file)


def _demo(args: argparse.Namespace) -> int:
    from resilgate import metrics_dir

    metrics_dir.prepare()  # before the gateway's modules import prometheus_client
    from resilgate.demo import run_demo

    config = _load(args.config)
    if config is None:
        return EXIT_CONFIG
    return run_demo(config, args.port, args.ephemeral, args.workers, args.ready_file)


def _simulate(args: argparse.Namespace) -> int:
    options = SimulatorOptions(kind=args.kind, site=args.site, seed=args.seed)
    run_simulator(options, args.host, args.port, args.ready_file)
    return 0


DURATION_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def _duration(text: str) -> float:
    """Seconds, or a number with a unit: 90, 90s, 15m, 2h, 1d."""
    factor = DURATION_UNITS.get(text[-1:].lower())
    try:
        value = float(text[:-1] if factor else text) * (factor or 1.0)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration: seconds, or 15m, 2h, 1d")
    return value


def _token_new(args: argparse.Namespace) -> int:
    import yaml
    from pydantic import ValidationError

    from resilgate.admin.auth import new_token, token_hash
    from resilgate.config import AdminToken

    token = new_token()
    try:
        entry = AdminToken(name=args.name, role=args.role, sha256=token_hash(token))
    except ValidationError as exc:
        reasons = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        print(f"error: {reasons}", file=sys.stderr)
        return EXIT_CONFIG
    if args.json:
        print(json.dumps({**entry.model_dump(), "token": token}, indent=2))
        return 0
    item = yaml.safe_dump([entry.model_dump()], sort_keys=False).rstrip("\n")
    print(f"token: {token}")
    print(f"  Give it to {entry.name} now: it is not kept anywhere (the config keeps its hash).")
    print("  They use it as: export RESILGATE_ADMIN_TOKEN=<token>")
    print()
    print("Add to admin.tokens in the config (or to the list in admin.tokens_file):")
    print("\n".join(f"  {line}" for line in item.splitlines()))
    return 0


def _admin_options() -> argparse.ArgumentParser:
    """What every admin API verb takes: where the API is, and whether to print its JSON."""
    options = argparse.ArgumentParser(add_help=False)
    options.add_argument(
        "--admin-url",
        help=f"admin API base URL (default: ${api.URL_ENV}, else {api.DEFAULT_URL}); "
        f"the token is read from ${api.TOKEN_ENV}",
    )
    options.add_argument("--json", action="store_true", help="print the API's JSON (for scripts)")
    return options


def _add_admin_verbs(verbs: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    common = _admin_options()

    def verb(
        parent: argparse._SubParsersAction[argparse.ArgumentParser],
        name: str,
        call: api.Verb,
        help_text: str,
    ) -> argparse.ArgumentParser:
        parser = parent.add_parser(name, help=help_text, parents=[common])
        parser.set_defaults(run=lambda args: api.run(call, args))
        return parser

    def reason(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--reason", required=True, help="why (kept in the audit log)")

    verb(verbs, "status", api.STATUS, "incident level, store, upstreams, degraded routes, queues")

    mode = verbs.add_parser("mode", help="force, clear or list modes (admin API)")
    actions = mode.add_subparsers(dest="action", required=True)
    force = verb(actions, "set", api.MODE_SET, "force an upstream, route or endpoint into a mode")
    force.add_argument("target", help="upstream, route, or endpoint as upstream/endpoint (a fence)")
    force.add_argument("mode", choices=["primary", "dr", "fallback", "maintenance"])
    reason(force)
    force.add_argument(
        "--expires-in", type=_duration, help="back to auto after this long: 900, 15m, 2h"
    )
    clear = verb(actions, "clear", api.MODE_CLEAR, "back to auto")
    clear.add_argument("target")
    reason(clear)
    verb(actions, "list", api.MODE_LIST, "modes in force: who, since, until, why")

    journal = verbs.add_parser("journal", help="journaled writes, dead letters, self-pay claims")
    entries = journal.add_subparsers(dest="action", required=True)
    listing = verb(entries, "list", api.JOURNAL_LIST, "entries in acceptance order, and queues")
    listing.add_argument(
        "--state",
        choices=["open", "dead", "all"],
        default="all",
        help="open: not replayed yet; dead: conflicts and failures left for a person",
    )
    listing.add_argument("--queue", help="only this queue (an upstream's name)")
    listing.add_argument("--limit", type=int, default=100, help="at most this many (1..1000)")
    for name, call, text in (
        ("show", api.JOURNAL_SHOW, "one entry's state and the upstream's answer"),
        ("retry", api.JOURNAL_RETRY, "replay a conflict or failed entry again"),
        ("discard", api.JOURNAL_DISCARD, "never replay this entry"),
    ):
        action = verb(entries, name, call, text)
        action.add_argument("ticket")
        if name != "show":
            reason(action)

    drill = verbs.add_parser("drill", help="emergency drills: a degraded mode for a bounded time")
    drills = drill.add_subparsers(dest="action", required=True)
    start = verb(drills, "start", api.DRILL_START, "force a degraded mode, restored by itself")
    start.add_argument("target", help="a route or upstream")
    start.add_argument("mode", choices=["fallback", "maintenance", "dr"])
    start.add_argument("--duration", type=_duration, required=True, help="e.g. 300, 5m, 1h")
    reason(start)
    show = verb(drills, "show", api.DRILL_SHOW, "a drill and its report")
    show.add_argument("id")
    verb(drills, "list", api.DRILL_LIST, "drills, newest first")

    token = verbs.add_parser("token", help="admin API tokens")
    tokens = token.add_subparsers(dest="action", required=True)
    fresh = tokens.add_parser("new", help="a fresh token and its entry for admin.tokens")
    fresh.add_argument("--name", required=True, help="who holds it; the audit log names them")
    fresh.add_argument("--role", choices=["viewer", "operator"], required=True)
    fresh.add_argument("--json", action="store_true", help="name, role, sha256 and token as JSON")
    fresh.set_defaults(run=_token_new)


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

    _add_admin_verbs(verbs)

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
