"""Command-line pieces shared by the tools."""
import argparse
import sys

from .rendezvous import DIST_URL_HELP


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports bad usage as one "error: ..." line (exit 2), like the tools' other
    input checks."""

    def error(self, message):
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)


def report_misplaced_flags(opts):
    """True (after printing one "error: ..." line) if "--flags" ended up in a tool's trailing
    KEY VALUE list: argparse hands everything after the first KEY to it."""
    flags = [o for o in opts[::2] if o.startswith("--")]
    if flags:
        print(f"error: put the options before the KEY VALUE pairs: {' '.join(flags)}", file=sys.stderr)
    return bool(flags)


def run_tool(parser, work, errors, argv=None):
    """A tool's main(): parse ``argv``, refuse --flags among the trailing KEY VALUE opts, run
    ``work(args)`` (its return value is the exit code; None = 0). An exception of ``errors`` (the
    user's mistakes) prints one "error: ..." line and exits 2."""
    args = parser.parse_args(argv)
    if report_misplaced_flags(args.opts):
        return 2
    try:
        code = work(args)
    except errors as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0 if code is None else code


def add_launch_arguments(parser):
    """fastreid's process flags, as tools/train_net.py has them (robustreid/rendezvous.py)."""
    parser.add_argument("--num-gpus", type=int, default=1,
                        help="processes per machine (GPUs; on CPU: gloo processes)")
    parser.add_argument("--num-machines", type=int, default=1, help="total number of machines")
    parser.add_argument("--machine-rank", type=int, default=0,
                        help="the rank of this machine (unique per machine)")
    parser.add_argument("--dist-url", default=None, help=DIST_URL_HELP)


def int_at_least(minimum):
    """An argparse ``type`` for integers >= ``minimum``: a bad value is reported by the parser
    ("error: argument --splits: must be an integer >= 1, got '0'")."""
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < minimum:
            raise argparse.ArgumentTypeError(f"must be an integer >= {minimum}, got {text!r}")
        return value

    return parse
