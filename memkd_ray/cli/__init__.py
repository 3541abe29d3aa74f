"""`memkd-ray` command line: parsing (parser.py) and calling, nothing else.

Exit codes: 0 ok, 2 bad usage or bad input (one-line reason), 1 anything else, 130 a run
stopped by SIGINT or SIGTERM (it can be resumed).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence

from memkd_ray.cli import models, serving, training
from memkd_ray.cli.parser import build_parser
from memkd_ray.cli.training import EXIT_INTERRUPTED
from memkd_ray.errors import UserInputError, VerificationError

log = logging.getLogger("memkd_ray")
HANDLERS = {"data": training.data, "train": training.train, "tune": training.tune,
            "eval": models.evaluate_checkpoint, "predict": models.predict, "export": models.export,
            "models": models.models, "runs": models.runs, "report": models.report,
            "serve": serving.serve}

__all__ = ["build_parser", "main"]


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _configure_logging(args.quiet)
    try:
        return HANDLERS[args.command](args) or 0
    except UserInputError as exc:
        print(f"memkd-ray: error: {exc}", file=sys.stderr)
        return 2
    except VerificationError as exc:
        print(f"memkd-ray: failed: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("memkd-ray: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception:
        log.exception("memkd-ray: failed")
        return 1


def _configure_logging(quiet: bool) -> None:
    """Our progress lines on stderr, one message per line; other libraries' logs untouched."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    log.handlers[:] = [handler]
    log.setLevel(logging.WARNING if quiet else logging.INFO)
    log.propagate = False
