"""The console script: picks the command and turns user errors into one line and exit status 2.

``plugins`` (:mod:`.plugins`), ``report`` and ``lm-eval`` parse their own arguments;
``recover`` (:mod:`.recover`) and mask learning (:mod:`.prune`: fit, validate, export,
evaluate) are ``LightningCLI`` runs.
"""

from __future__ import annotations

import sys
import traceback

from lightning_prune.cli.plugins import print_plugins
from lightning_prune.cli.prune import prune_main
from lightning_prune.cli_names import install_short_names
from lightning_prune.errors import debug_requested, user_error


def main(args: list[str] | None = None) -> None:
    """Console-script entry point.

    ``lightning-prune --debug COMMAND ...`` (or ``LIGHTNING_PRUNE_DEBUG=1``) prints the
    traceback of a user error before its one-line message.
    """
    argv = sys.argv[1:] if args is None else list(args)
    debug = argv[:1] == ["--debug"]
    if debug:
        argv = argv[1:]
    if argv[:1] == ["plugins"]:
        raise SystemExit(print_plugins(argv[1:]))
    if argv[:1] == ["report"]:
        from lightning_prune.report.command import main as report_main

        raise SystemExit(report_main(argv[1:], debug))
    if argv[:1] == ["lm-eval"]:  # optional extra: lightning-prune[lm-eval]
        from lightning_prune.lm_eval_adapter import main as lm_eval_main

        raise SystemExit(lm_eval_main(argv[1:]))
    install_short_names()
    try:
        if argv[:1] == ["recover"]:
            from lightning_prune.cli.recover import recover_main

            recover_main(argv[1:])
        else:
            prune_main(None if args is None and not debug else argv)
    except Exception as err:
        ours = user_error(err)
        if ours is None:
            raise
        if debug or debug_requested():  # the whole chain, from the library error up
            traceback.print_exception(err, file=sys.stderr)
        print(f"lightning-prune: error: {ours}", file=sys.stderr)
        raise SystemExit(2) from None
