"""Argument parsing shared by the `tensafe <verb>` utilities (keys, package, audit, evidence)."""

from __future__ import annotations

import argparse

from tensafe.errors import UserError

KEYSTORE_HELP = "keystore folder (default: $TENSAFE_KEYSTORE or ~/.tensafe/keys)"


class VerbParser(argparse.ArgumentParser):
    """argparse whose usage errors are one-line UserErrors (the entrypoint prints them, exit 2)."""

    error_class: type[UserError] = UserError

    def error(self, message: str):
        raise self.error_class(f"{self.prog.removeprefix('tensafe ')}: {message} (see `{self.prog} --help`)")


def verb_parser(
    prog: str, description: str, error_class: type[UserError], options: dict[str, dict],
) -> tuple[VerbParser, argparse._SubParsersAction, argparse.ArgumentParser]:
    """The verb's parser, its subcommands, and a parent parser for them: each of `options` (flag →
    add_argument keywords, e.g. --keystore) is accepted before or after the subcommand."""
    parser_class = type(f"{error_class.__name__}Parser", (VerbParser,), {"error_class": error_class})
    parser = parser_class(prog=prog, description=description)
    common = argparse.ArgumentParser(add_help=False)
    for flag, keywords in options.items():
        parser.add_argument(flag, default=None, **keywords)
        common.add_argument(flag, default=argparse.SUPPRESS, **keywords)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)  # same parser class
    return parser, sub, common
