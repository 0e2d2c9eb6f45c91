"""`tensafe <verb> ...`: the command-line utilities that act on artifacts (keys, packages, the
audit log, evidence). Each module has `cli(argv) -> int` with argparse subcommands and --help;
they parse arguments and call the library (`tensafe.security`), and hold no logic of their own."""
