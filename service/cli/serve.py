"""`exitserve serve`: one flag per server setting, generated from `Settings` (env vars still work)."""

from __future__ import annotations

import argparse

from exitserve.service.cli.flags import add_parser, add_settings_flags, given_settings
from exitserve.service.settings import Settings

ENV_PREFIX = Settings.model_config.get("env_prefix", "")
# Short spellings kept from before the flags were generated (scripts and docs use them).
ALIASES: dict[str, tuple[str, ...]] = {
    "default_delta": ("--delta",), "default_policy": ("--policy",), "request_timeout_s": ("--request-timeout",),
}


def _cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from exitserve.service.app import create_app
    from exitserve.service.logs import configure_logging
    from exitserve.service.protocols.http_limits import uvicorn_options

    overrides = given_settings(args, args.settings_flags)
    if args.bundles:
        overrides["bundles"] = args.bundles
    settings = Settings(**overrides)
    configure_logging(settings.log_level)
    app = create_app(settings)  # loads and verifies every bundle: a bad one stops start-up here
    uvicorn.run(
        app, host=settings.host, port=settings.port, log_config=None, access_log=False,
        timeout_graceful_shutdown=int(settings.drain_timeout_s) or None,
        **uvicorn_options(settings),  # header size/count limits, header and keep-alive timeouts
    )
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = add_parser(sub, "serve", "serve bundles over HTTP (v1 REST and the Open Inference Protocol); every flag "
                                 f"also reads from its {ENV_PREFIX}* environment variable")
    p.add_argument("bundles", nargs="*", help="bundle directories (default: EXITSERVE_BUNDLES, else the committed "
                                              "default bundle)")
    flags = add_settings_flags(p, Settings, env_prefix=ENV_PREFIX, skip=("bundles",), aliases=ALIASES)
    p.set_defaults(func=_cmd_serve, settings_flags=flags)
