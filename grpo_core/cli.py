"""What every entry point shares: one-line errors with the exit code from grpo_core.exitcodes."""
from __future__ import annotations

import argparse
import sys
from typing import NoReturn

from grpo_core.exitcodes import EXIT_BAD_INPUT


def fail(message: str, code: int = EXIT_BAD_INPUT) -> NoReturn:
    """One line on stderr, no traceback, then exit with `code`."""
    print(f"error: {' '.join(str(message).split())}", file=sys.stderr, flush=True)
    raise SystemExit(code)


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one line (argparse prints the whole usage block)."""

    def error(self, message: str) -> NoReturn:
        fail(f"{message} (see {self.prog} --help)", EXIT_BAD_INPUT)
