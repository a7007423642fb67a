"""``esm-dual``: the command-line entry point.

Subcommands live in their own modules, each with ``add_arguments(parser)`` and ``run(args) -> int``.
Importing this module imports neither torch nor TensorFlow: a subcommand's module is imported when the
parser is built (they import their framework inside ``run``), and ``fold`` only when it is the command.

Errors in the user's input (a bad file, an unknown model, conflicting options) print one line to
stderr and exit with status 2; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import os
import sys
from collections.abc import Sequence

# name -> (module, one-line help). Modules are imported lazily.
COMMANDS: dict[str, tuple[str, str]] = {
    "embed": ("esm_dual.cli.embed", "per-sequence / per-residue embeddings and contact maps of a FASTA file"),
    "score": ("esm_dual.cli.score", "score the variants of a deep mutational scan (fair-esm predict.py)"),
    "fold": ("esm_dual.cli.fold", "predict structures with ESMFold"),
    "info": ("esm_dual.cli.info", "describe a checkpoint, or list the known presets"),
    "convert": ("esm_dual.cli.convert", "convert checkpoints between layouts (hf, keras, tf-h5, fair-esm)"),
    "init": ("esm_dual.cli.init", "write a checkpoint of RANDOM weights in any preset's shape (offline examples, "
             "tests)"),
}
# Commands whose module is imported only when the command is used (it may be heavy or absent).
LAZY_COMMANDS = {"fold"}

# Exceptions that mean "bad input", matched by class name so this module stays import-light.
USER_ERRORS = {
    "CliError", "FastaError", "CheckpointError", "ConfigError", "LoadingError", "EmbeddingStoreError",
    "TokenizerError", "FileNotFoundError", "IsADirectoryError", "NotADirectoryError", "PermissionError",
    "FileExistsError",
}
QUIET_FLAGS = ("-q", "--quiet")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line + usage hint, exit 2 (argparse's own convention)
        self.exit(2, f"{self.prog}: error: {message}\n(see `{self.prog} --help`)\n")


def _module_missing(name: str, exc: ImportError) -> bool:
    return isinstance(exc, ModuleNotFoundError) and exc.name in (name, *_parents(name))


def _parents(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The full parser. Lazy commands get their arguments only when ``command`` names them."""
    parser = _Parser(prog="esm-dual", description="ESM protein language models and ESMFold in PyTorch "
                     "and TensorFlow.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    parser.subcommands = {}  # name -> its parser (usage errors point at the subcommand's --help)
    for name, (module, help_) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        parser.subcommands[name] = p
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        p.set_defaults(_module=module)
        if name in LAZY_COMMANDS and command != name:
            p.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
            continue
        try:
            mod = importlib.import_module(module)
        except ImportError as e:
            if not _module_missing(module, e):
                raise
            p.set_defaults(_missing=f"`esm-dual {name}` is not available in this installation "
                                    f"({module} is missing)")
            p.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
            continue
        mod.add_arguments(p)
    return parser


def _version() -> str:
    from esm_dual import __version__

    return __version__


def _command_of(argv: Sequence[str]) -> str | None:
    for a in argv:
        if a in COMMANDS:
            return a
        if not a.startswith("-"):
            return None
    return None


# OSErrors of the machine, not of esm-dual: a full disk, a quota, a read-only file system.
_ENVIRONMENT_ERRNOS = {getattr(errno, n) for n in ("ENOSPC", "EDQUOT", "EROFS") if hasattr(errno, n)}


def _is_user_error(exc: BaseException) -> bool:
    if isinstance(exc, OSError) and exc.errno in _ENVIRONMENT_ERRNOS:
        return True
    return any(c.__name__ in USER_ERRORS for c in type(exc).__mro__)


def _message(exc: BaseException) -> str:
    if isinstance(exc, KeyError) and exc.args:
        return str(exc.args[0])
    msg = str(exc) or type(exc).__name__
    if isinstance(exc, OSError) and exc.filename and str(exc.filename) not in msg:
        msg = f"{exc.filename}: {msg}"
    return " ".join(msg.split()) if "\n" in msg and len(msg.splitlines()) > 1 else msg


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    from ._common import configure_logging

    handler = configure_logging()
    command = _command_of(argv)
    if any(a in QUIET_FLAGS for a in argv):
        from ._common import quiet_frameworks

        quiet_frameworks()
    else:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's C++ start-up chatter
    try:
        try:
            parser = build_parser(command)
            try:
                args, extra = parser.parse_known_args(argv)
                if extra and isinstance(getattr(args, "_positionals", None), list):
                    # positionals after an option (`embed FASTA -m MODEL OUT`): argparse leaves them over
                    args._positionals += [a for a in extra if not a.startswith("-")]
                    extra = [a for a in extra if a.startswith("-")]
                if extra:  # reported by the subcommand's parser, so the hint names its --help
                    sub = parser.subcommands.get(getattr(args, "command", None) or "", parser)
                    sub.error(f"unrecognized arguments: {' '.join(extra)}")
            except SystemExit as e:  # --help, --version, usage errors: argparse already printed them
                return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
            if args.command is None:
                parser.print_help(sys.stderr)
                return 2
            debug = debug or getattr(args, "debug", False)
            if getattr(args, "_missing", None):
                print(f"esm-dual: error: {args._missing}", file=sys.stderr)
                return 2
            mod = importlib.import_module(args._module)
            return int(mod.run(args) or 0)
        except KeyboardInterrupt:
            if debug:
                raise
            print("esm-dual: interrupted", file=sys.stderr)
            return 130
        except Exception as e:
            if debug:
                raise
            if _is_user_error(e):
                print(f"esm-dual: error: {_message(e)}", file=sys.stderr)
                if type(e).__name__ == "UsageError":
                    print(f"(see `esm-dual {command or ''} --help`)".replace("  ", " "), file=sys.stderr)
                return 2
            print(f"esm-dual: internal error: {type(e).__name__}: {_message(e)} "
                  "(rerun with --debug for the traceback)", file=sys.stderr)
            return 1
    finally:
        import logging

        logging.getLogger("esm_dual").removeHandler(handler)


def entry() -> None:  # pragma: no cover - console-script shim
    sys.exit(main())


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
