"""The `configserver` command: parses arguments, loads the settings, calls the rest."""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .settings import Settings, SettingsError, load_settings


def _settings(args: argparse.Namespace, **overrides: object) -> Settings:
    return load_settings(config_file=args.config, **overrides)


def _cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from .logs import configure_logging

    overrides = {"host": args.host, "port": args.port, "uds": args.uds, "workers": args.workers}
    settings = _settings(args, **overrides)
    configure_logging(settings.log_level)
    from .hardening import log_startup_warnings

    log_startup_warnings(settings)   # once, here: not in every worker
    from .tls import uvicorn_options

    options = uvicorn_options(settings)   # the listener's limits, and mutual TLS when built in
    from .app import configure_security_log, create_app

    # Built once here, so that a bad setting stops us now; with one worker it is the app served,
    # with several each worker builds its own from the same sources.
    app = create_app(settings)
    configure_security_log(settings)
    # Every worker builds its own app from the environment: hand it the same sources.
    handed = {f"CONFIGSERVER_{key.upper()}": str(value) for key, value in overrides.items() if value is not None}
    if args.config is not None:
        handed["CONFIGSERVER_CONFIG_FILE"] = str(Path(args.config).absolute())
    metrics_dir = None
    if settings.workers > 1 and not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        # /metrics answers from one worker: let it add up all of them
        metrics_dir = tempfile.mkdtemp(prefix="configserver-metrics-")
        handed["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    saved = {key: os.environ.get(key) for key in handed}
    os.environ.update(handed)
    try:
        _run_uvicorn(uvicorn, settings, options, app if settings.workers == 1 else None)
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        if metrics_dir is not None:
            shutil.rmtree(metrics_dir, ignore_errors=True)
    return 0


def _run_uvicorn(uvicorn: Any, settings: Settings, options: dict[str, object], app: Any = None) -> None:
    from .logs import logging_config

    uvicorn.run(
        app if app is not None else "configserver.app:create_app_from_environment",
        factory=app is None,
        # a start-up that fails (templates, inventory) must stop the service, not run it without
        lifespan="on",
        host=settings.host,
        port=settings.port,
        uds=str(settings.uds) if settings.uds else None,
        workers=settings.workers,
        # Client addresses come from our own trusted-proxy rules, never from uvicorn's.
        proxy_headers=False,
        # One structured line per poll replaces the access log.
        access_log=False,
        server_header=False,
        log_config=logging_config(settings.log_level),
        **options,
    )


def _cmd_lab_init(args: argparse.Namespace) -> int:
    from .lab import LabError, create_lab

    try:
        lab = create_lab(args.directory, force=args.force)
    except LabError as exc:
        print(f"configserver: {exc}", file=sys.stderr)
        return 1
    print(f"lab created in {lab.root} (never trust it in production)")
    print(f"serve it:  configserver --config {lab.config} serve")
    print(f"poll it:   configserver lab poll IP232-30-00-af --lab {lab.root}")
    return 0


def _cmd_lab_poll(args: argparse.Namespace) -> int:
    from .lab import LabError, find_lab, poll, server_url, with_path
    from .settings import DEFAULT_CONFIG_FILE

    settings_file = args.config or (DEFAULT_CONFIG_FILE if DEFAULT_CONFIG_FILE.is_file() else None)
    try:
        lab = find_lab(args.lab, settings_file=settings_file, cwd=Path.cwd())
        device = lab.device(args.hwid)
        url = args.url or server_url(load_settings(config_file=settings_file or lab.config))
        answer = poll(with_path(url, args.path), cert=device.cert, key=device.key, server_ca=lab.server_ca)
    except LabError as exc:
        print(f"configserver: lab poll {args.hwid}: {exc}", file=sys.stderr)
        return 1
    print(answer.status_line, flush=True)
    sys.stdout.buffer.write(answer.body)
    return 0 if answer.status < 300 else 1


def _cmd_inventory(args: argparse.Namespace) -> int:
    from . import inventory

    settings = _settings(args)
    database = settings.database
    try:
        if args.command == "migrate":
            print(f"inventory schema at version {inventory.migrate_database(database)}")
        elif args.command == "history":
            print(inventory.history_table(inventory.device_history(
                database, args.device, limit=args.limit, fixes=settings.model_fixes)), end="")
        else:
            filters = {"model": args.model, "since": args.since, "status": args.status, "stale": args.stale}
            # streamed as the database hands the rows over: a fleet of any size
            write = inventory.write_devices_json if args.json else inventory.write_devices_table
            write(database, sys.stdout, **filters)
    except inventory.InventoryError as exc:
        print(f"configserver {args.command}: {exc}", file=sys.stderr)
        return 1
    return 0


def _cmd_backups(args: argparse.Namespace) -> int:
    """`backups HWID|MAC [--show N | --diff [A [B]]]`, `backups --missing DURATION`, `backups --now TARGET...`."""
    from .backups import _admin as backups

    settings = _settings(args)
    fixes = settings.model_fixes
    try:
        if args.now:
            targets = backups.request_targets(args.now, settings.groups, fixes)
            backups.run(settings.database, lambda store: store.request(target for target, _ in targets))
            for _, meaning in targets:
                print(f"asked now: {meaning}; each uploads after its next poll")
            return 0
        if args.missing:
            seconds = backups.parse_duration(args.missing)
            print(backups.missing_table(backups.run(settings.database, lambda store: store.missing(seconds))), end="")
            return 0
        if args.device is None:
            print("configserver backups: give a device (HWID or MAC), --missing DURATION or --now TARGET",
                  file=sys.stderr)
            return 2
        mac, hwid = backups.device_key(args.device, fixes)
        label = hwid or mac
        if args.diff is not None and len(args.diff) > 2:
            raise backups.BackupsError("--diff takes at most two version numbers")
        show = backups.version_number(args.show) if args.show is not None else None
        wanted = [backups.version_number(n) for n in args.diff or ()]

        async def read(store):  # type: ignore[no-untyped-def]
            versions = await store.versions(mac)
            if show is not None:
                return versions, await store.content(mac, show)
            if args.diff is not None:
                numbers = list(wanted) or [v.number for v in versions[:2]][::-1]
                if len(args.diff) == 1:
                    numbers.append(versions[0].number if versions else numbers[0])
                return versions, [(n, await store.content(mac, n)) for n in numbers]
            return versions, (await store.state(mac), await store.facts(mac))

        versions, found = backups.run(settings.database, read)
        if args.show is not None:
            if found is None:
                raise backups.BackupsError(f"{label} has no version {args.show} (see configserver backups {label})")
            sys.stdout.buffer.write(found)
            sys.stdout.flush()
        elif args.diff is not None:
            if len(found) < 2:
                raise backups.BackupsError(f"{label} has fewer than two versions to compare")
            for number, content in found:
                if content is None:
                    raise backups.BackupsError(f"{label} has no version {number} (see configserver backups {label})")
            print(backups.diff_text(mac, label, found[0], found[1]), end="")
        else:
            print(backups.listing(label, mac, found[0], versions, found[1]), end="")
    except (backups.InventoryError, ValueError) as exc:
        print(f"configserver backups: {exc}", file=sys.stderr)
        return 1
    return 0


def _cmd_check(args: argparse.Namespace) -> int:
    from .lint import check
    from .settings import DEFAULT_CONFIG_FILE

    settings = _settings(args)
    config_file = args.config or (DEFAULT_CONFIG_FILE if DEFAULT_CONFIG_FILE.is_file() else None)
    problems = check(settings, config_file=config_file)
    for problem in problems:
        print(problem)
    print(f"configserver check: {len(problems) or 'no'} problem{'' if len(problems) == 1 else 's'} "
          f"in {settings.templates} and {settings.vars}", file=sys.stderr)
    return 1 if problems else 0


def _cmd_render(args: argparse.Namespace) -> int:
    from .preview import UnresolvedDevice, preview
    from .service import Service

    query = []
    for item in args.query:
        key, equals, value = item.partition("=")
        if not equals:
            print(f"configserver render: --query {item!r}: give KEY=VALUE", file=sys.stderr)
            return 2
        query.append((key, value))
    settings = _settings(args)
    backups = _backup_schedule(settings) if settings.backup_url is not None else None
    service = Service.from_settings(settings, grace_seconds=0, backups=backups)   # the files as they are now
    service.store.refresh()
    try:
        answer = preview(service, args.device, args.path, query, halts=_firmware_halts(settings))
    except UnresolvedDevice as exc:
        print(f"configserver render: {exc}", file=sys.stderr)
        return 2
    for line in answer.headers():
        print(line, file=sys.stderr)
    sys.stderr.flush()
    sys.stdout.buffer.write(answer.body)
    sys.stdout.flush()
    return 0 if answer.record.status == 200 else 1


def _cmd_firmware(args: argparse.Namespace) -> int:
    import time

    from .firmware import FirmwareError, _report
    from .inventory import InventoryError

    settings = _settings(args)
    now = time.time()
    action = getattr(args, "firmware_command", None)
    kinds = (args.kind or ["prot", "boot"]) if action else []
    try:
        if action == "resume":
            resumed = _report.resume(settings, args.model, kinds, now)
            for model, kind, build in resumed:
                print(f"resumed: {model.upper()} {kind} {build}")
            if not resumed:
                print(f"configserver firmware resume: no halted rollout of {args.model} ({', '.join(kinds)})",
                      file=sys.stderr)
                return 1
        elif action == "halt":
            halted = _report.halt_current(settings, args.model, kinds, now)
            for kind, build in halted:
                print(f"halted: {args.model.upper()} {kind} {build}")
            if not halted:
                print(f"configserver firmware halt: {args.model} has no target to halt", file=sys.stderr)
                return 1
        else:
            print(_report.report_text(_report.report(settings, now), now), end="")
    except (InventoryError, FirmwareError) as exc:
        print(f"configserver firmware: {exc}", file=sys.stderr)
        return 1
    return 0


def _firmware_halts(settings: Settings) -> Callable[[], frozenset[tuple[str, str, str]]]:
    """Let `render` leave out the firmware a halted rollout would not send: how to read the
    halts in the database (when the device has a firmware target). Without the database it says
    so, and shows the lines as if none were halted."""
    from .firmware import _report
    from .inventory import InventoryError

    def read() -> frozenset[tuple[str, str, str]]:
        try:
            return _report.halts(settings)
        except InventoryError as exc:
            print(f"note: firmware halts not known: the database does not answer ({exc}); the firmware "
                  "lines are shown as if no rollout were halted", file=sys.stderr)
            return frozenset()

    return read


def _backup_schedule(settings: Settings) -> Any:
    """Let `render` show the backup requests a poll would carry now: what the fleet's uploads
    and the admins' requests in the database say. Without the database it says so: None."""
    import asyncio

    from .backups import Backups

    backups = Backups.from_settings(settings)
    assert backups is not None

    async def learn() -> None:
        try:
            await backups.asking.refresh()
        finally:
            await backups.store.close()

    try:
        asyncio.run(learn())
    except Exception as exc:  # noqa: BLE001 - the database is away or has no backups yet
        print(f"note: backup requests not shown: the database does not answer ({type(exc).__name__})",
              file=sys.stderr)
        return None
    backups.asking.since = float("-inf")   # a preview is not a restart: every device due now is shown due
    return backups.asking


def _cmd_trust_value(args: argparse.Namespace) -> int:
    from .trust import TrustValueError, trust_value

    try:
        value = trust_value(args.certificate.read_bytes(), args.properties)
    except (OSError, TrustValueError) as exc:
        print(f"configserver trust-value: {args.certificate}: {exc}", file=sys.stderr)
        return 1
    print(value)   # outside the try: a closed stdout is no problem with the certificate
    return 0


def _cmd_admin_user(args: argparse.Namespace) -> int:
    """`admin-user add|remove|list`: the admin page's users file (setting `admin_users`)."""
    from .admin import UsersError, add_user, read_users, remove_user

    # Absolute in what is said: a relative setting is the working directory's file, which
    # need not be the one admin-serve reads (README "Admin page").
    path = _settings(args).admin_users.absolute()
    try:
        if args.admin_command == "list":
            if not path.exists():
                print(f"configserver admin-user: no users file {path} (setting 'admin_users')", file=sys.stderr)
            for name in sorted(read_users(path)):
                print(name)
        elif args.admin_command == "remove":
            remove_user(path, args.name)
            print(f"removed {args.name} from {path}")
        else:
            password = _read_password(args.name)
            new = add_user(path, args.name, password)
            print(f"{'added' if new else 'new password for'} {args.name} in {path}")
    except UsersError as exc:
        print(f"configserver admin-user: {exc}", file=sys.stderr)
        return 1
    return 0


def _read_password(name: str) -> str:
    """From a terminal: asked twice, never echoed. From a pipe: the first line of stdin."""
    import getpass

    if not sys.stdin.isatty():
        return sys.stdin.readline().rstrip("\r\n")
    first = getpass.getpass(f"password for {name}: ")
    if getpass.getpass("again: ") != first:
        from .admin import UsersError

        raise UsersError("the two passwords differ; nothing changed")
    return first


def _cmd_admin_serve(args: argparse.Namespace) -> int:
    from .admin import AdminNotConfigured, serve

    try:
        serve(_settings(args))
    except AdminNotConfigured as exc:
        print(f"configserver admin-serve: {exc}", file=sys.stderr)
        return 2
    return 0


def _device_name(text: str) -> str:
    """A HWID or MAC argument: printable text (bytes that are not UTF-8 reach us as surrogates)."""
    if not text.isprintable() or any("\udc80" <= ch <= "\udcff" for ch in text) or len(text) > 64:
        shown = text.encode("utf-8", "surrogateescape").decode("ascii", "backslashreplace")[:80]
        shown = "".join(ch if ch.isprintable() else f"\\x{ord(ch):02x}" for ch in shown)
        raise argparse.ArgumentTypeError(f"'{shown}' is neither "
                                         "a hwid (IP232-30-00-af) nor a MAC (00-90-33-30-00-af)")
    return text


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="configserver",
        description="Partner config server for innovaphone devices.",
    )
    parser.add_argument(
        "--config", type=Path, default=None,
        help="settings file (TOML); default: configserver.toml in the working directory, if present",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="serve device polls")
    serve.add_argument("--host", help="address to listen on (setting: host)")
    serve.add_argument("--port", type=int, help="port to listen on (setting: port)")
    serve.add_argument("--uds", type=Path, help="listen on this unix socket instead (setting: uds)")
    serve.add_argument("--workers", type=int, help="worker processes (setting: workers)")
    serve.set_defaults(run=_cmd_serve)

    lab = commands.add_parser("lab", help="a lab PKI and device for trying and testing").add_subparsers(
        dest="lab_command", required=True, metavar="LAB_COMMAND")
    lab_init = lab.add_parser("init", help="create a lab: CAs, devices, server certificate, templates, settings")
    lab_init.add_argument("directory", type=Path)
    lab_init.add_argument("--force", action="store_true", help="replace the lab already in DIRECTORY")
    lab_init.set_defaults(run=_cmd_lab_init)
    lab_poll = lab.add_parser("poll", help="poll the server as a lab device; print the status line and script")
    lab_poll.add_argument("hwid", help="the lab device's hwid or name (see lab/README.txt)")
    lab_poll.add_argument("--path", help="path and query to poll (default: that of --url, or /)")
    lab_poll.add_argument("--url", help="poll a terminator at this https:// URL instead of the configured server")
    lab_poll.add_argument("--lab", type=Path, default=None,
                          help="the lab folder (default: the one the settings file lies in, the working folder, or lab)")
    lab_poll.set_defaults(run=_cmd_lab_poll)

    devices = commands.add_parser("devices", help="the devices that polled: last seen, status, firmware, template")
    devices.add_argument("--json", action="store_true", help="JSON in the shape of innovaphone's discovery list")
    devices.add_argument("--model", help="only this model (IP232, any case)")
    devices.add_argument("--since", metavar="DURATION", help="only devices seen within DURATION (30m, 12h, 7d, 2w)")
    devices.add_argument("--status", type=int, metavar="CODE", help="only devices whose last poll got this HTTP status")
    devices.add_argument("--stale", metavar="DURATION", help="only devices not seen for DURATION: dead phones")
    devices.set_defaults(run=_cmd_inventory)
    history = commands.add_parser("history", help="one device's polls, newest first")
    history.add_argument("device", type=_device_name, metavar="HWID|MAC", help="IP232-30-00-af, 00-90-33-30-00-af, 0090333000af, ...")
    history.add_argument("--limit", type=int, default=20, metavar="N", help="at most N polls (default: 20)")
    history.set_defaults(run=_cmd_inventory)
    migrate = commands.add_parser("migrate", help="create or update the inventory database's schema now")
    migrate.set_defaults(run=_cmd_inventory)
    # -- configuration backups (README "Configuration backups") --
    backups = commands.add_parser(
        "backups", help="a device's configuration backups; devices missing one; ask for them now")
    backups.add_argument("device", nargs="?", metavar="HWID|MAC", help="list this device's versions")
    backups.add_argument("--show", type=int, metavar="N", help="print version N as the device uploaded it")
    backups.add_argument("--diff", nargs="*", metavar="A B",
                         help="unified diff of versions A and B (default: the last two; A alone: A and the newest)")
    backups.add_argument("--missing", metavar="DURATION", help="devices with no backup for DURATION (12h, 2d, 1w)")
    backups.add_argument("--now", nargs="+", metavar="TARGET",
                         help="ask at the next poll: all, a HWID or MAC, a group or a model")
    backups.set_defaults(run=_cmd_backups)
    # -- end of configuration backups --

    from .cabundle import run_check

    check_cas = commands.add_parser(
        "check-cas", help="check a device CA bundle: innovaphone's CA 1 and CA 2, nothing else")
    check_cas.add_argument("bundle", type=Path, help="the PEM file, e.g. /etc/configserver/innovaphone-device-cas.pem")
    check_cas.set_defaults(run=lambda args: run_check(args.bundle, sys.stdout))

    check = commands.add_parser(
        "check", help="check the templates and vars folders; print file:line: problem, exit 1 on any")
    check.set_defaults(run=_cmd_check)
    render = commands.add_parser(
        "render", help="print the answer a device would get now; how it was chosen goes to stderr")
    render.add_argument("device", type=_device_name, metavar="HWID|MAC", help="IP232-30-00-af, or a MAC when a file names its hwid")
    render.add_argument("--path", default="/", help="the path (and query) the device polls (default: /)")
    render.add_argument("--query", action="append", default=[], metavar="K=V",
                        help="a query argument of the poll, e.g. CHECK=<serial> (repeatable)")
    render.set_defaults(run=_cmd_render)
    trust = commands.add_parser(
        "trust-value", help="print the my.innovaphone Trust value for our server certificate")
    trust.add_argument("certificate", type=Path, metavar="CERT.pem", help="the server certificate (PEM or DER), alone")
    trust.add_argument("--properties", metavar="LIST",
                       help="prefix the properties the device should be handed: type,ip or *")
    trust.set_defaults(run=_cmd_trust_value)

    # -- the admin page (README "Admin page") --
    admin_serve = commands.add_parser(
        "admin-serve", help="serve the admin page on its own listener (settings admin_port or admin_uds)")
    admin_serve.set_defaults(run=_cmd_admin_serve)
    admin_user = commands.add_parser("admin-user", help="the admin page's users (setting admin_users)").add_subparsers(
        dest="admin_command", required=True, metavar="ACTION")
    admin_add = admin_user.add_parser("add", help="add a user or set a new password (asked, or read from stdin)")
    admin_add.add_argument("name")
    admin_add.set_defaults(run=_cmd_admin_user)
    admin_remove = admin_user.add_parser("remove", help="remove a user")
    admin_remove.add_argument("name")
    admin_remove.set_defaults(run=_cmd_admin_user)
    admin_user.add_parser("list", help="list the users").set_defaults(run=_cmd_admin_user)
    # -- end of the admin page --

    # -- firmware (README "Firmware") --
    firmware = commands.add_parser(
        "firmware", help="the firmware rollout per model: targets, devices on them, waves, failures, halts")
    firmware_actions = firmware.add_subparsers(dest="firmware_command", metavar="ACTION")
    firmware.set_defaults(run=_cmd_firmware)
    firmware_resume = firmware_actions.add_parser("resume", help="resume a model's halted rollout")
    firmware_halt = firmware_actions.add_parser("halt", help="halt a model's rollout of its current target by hand")
    for action in (firmware_resume, firmware_halt):
        action.add_argument("model", help="the model, e.g. IP232 (any case)")
        action.add_argument("--kind", choices=("prot", "boot"), action="append",
                            help="prot (firmware) or boot (boot code); default: both")
        action.set_defaults(run=_cmd_firmware)
    # -- end of firmware --

    _accept_config_after_subcommands(parser)
    return parser


def _accept_config_after_subcommands(parser: argparse.ArgumentParser) -> None:
    """`configserver serve --config F` works as well as `configserver --config F serve`."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                sub.add_argument("--config", type=Path, default=argparse.SUPPRESS, help="settings file (TOML)")
                _accept_config_after_subcommands(sub)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `configserver` command. Returns the exit status."""
    try:
        try:
            args = build_parser().parse_args(argv)   # --help prints, then raises SystemExit
            return args.run(args)
        finally:
            sys.stdout.flush()   # here, not at exit: a reader that went away must show up in this try
    except BrokenPipeError:
        return _reader_went_away()
    except SettingsError as exc:
        print(f"configserver: {exc}", file=sys.stderr)
        return 2


def _reader_went_away() -> int:
    """Whoever read our output closed it (`configserver ... | head -1`): leave quietly, as cat
    and grep do. Python would otherwise print a traceback, and once more at exit when it
    flushes what is still buffered: point stdout at /dev/null first."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    return 141   # what the shell reports for a command that SIGPIPE ended: 128 + 13


if __name__ == "__main__":
    sys.exit(main())
