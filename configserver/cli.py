"""The `configserver` command: parses arguments, loads the settings, calls the rest."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from .settings import Settings, SettingsError, load_settings


def _settings(args: argparse.Namespace, **overrides: object) -> Settings:
    return load_settings(config_file=args.config, **overrides)


def _cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from .logs import configure_logging

    overrides = {"host": args.host, "port": args.port, "uds": args.uds, "workers": args.workers}
    settings = _settings(args, **overrides)
    configure_logging(settings.log_level)
    # Every worker builds its own app from the environment: hand it the same sources.
    if args.config is not None:
        os.environ["CONFIGSERVER_CONFIG_FILE"] = str(Path(args.config).absolute())
    for key, value in overrides.items():
        if value is not None:
            os.environ[f"CONFIGSERVER_{key.upper()}"] = str(value)
    options: dict[str, object] = {}
    if settings.builtin_tls:
        from .tls import uvicorn_options

        options = uvicorn_options(settings)
    uvicorn.run(
        "configserver.app:create_app_from_environment",
        factory=True,
        host=settings.host,
        port=settings.port,
        uds=str(settings.uds) if settings.uds else None,
        workers=settings.workers,
        # Client addresses come from our own trusted-proxy rules, never from uvicorn's.
        proxy_headers=False,
        # One structured line per poll replaces the access log.
        access_log=False,
        server_header=False,
        log_config=None,
        **options,
    )
    return 0


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

    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `configserver` command. Returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except SettingsError as exc:
        print(f"configserver: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
