"""Command-line pieces shared by the tools."""
import argparse
import sys


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports bad usage as one "error: ..." line (exit 2), like the tools' other
    input checks."""

    def error(self, message):
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)
