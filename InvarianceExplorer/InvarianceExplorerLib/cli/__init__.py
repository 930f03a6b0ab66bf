"""``invariance-explorer``: the engine on the command line (files in, files out).

Commands:
    demo            simulate a low-dose chest slice and write NRRD + PNG (bundled data only)
    data simulate   write a paired low-/full-dose training set of simulated chest slices
    data lowdose    simulate a low-dose scan of a user's full-dose CT (file or DICOM folder)
    train denoiser  train CNN-10, RED-CNN, WGAN-VGG or DU-GAN on paired data (resumable)
    train cvae      train the representation (cVAE) of a frozen denoiser (resumable, torchrun)
    train cinn      train the invariance flow (cINN) on a cVAE's codes (resumable, torchrun)
    fit             your own denoiser (TorchScript, MONAI bundle, class + state dict): check it,
                    fit its invariance models, write a model folder (resumable, torchrun)
    denoise         denoise a CT image or volume with a bundled or trained denoiser
    sample          sample the invariances of a denoiser for a patch around a voxel
    analyze         find the invariances that change anatomy in a sample output folder
    trust           let the code of an imported denoiser's model folder run on this machine

Errors in the user's input or files (unreadable, unwritable) are reported in one line (what was
wrong and what to do) with exit status 2; nothing is written in that case. Warnings print as one
line each; an interrupted command (Ctrl-C) exits with status 130.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
import warnings
from typing import List, Optional

from .. import __version__
from .admin import _add_gui, _add_trust
from .data import _add_data, _add_demo
from .train import _add_fit, _add_train
from .use import _add_analyze, _add_denoise, _add_sample


def build_parser(command: Optional[str] = None) -> argparse.ArgumentParser:
    """The ``invariance-explorer`` parser. With ``command`` (a name of :data:`COMMANDS`, or ""
    for none) only that command gets its arguments: each command's builder imports the engine
    modules its choices and defaults come from (which import torch), so ``--help``,
    ``--version`` and a mistyped command answer at once."""
    parser = argparse.ArgumentParser(prog="invariance-explorer", description=__doc__.split("\n")[0])
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (helptext, add_arguments) in COMMANDS.items():
        p = sub.add_parser(name, help=helptext)
        if command is None or command == name:
            add_arguments(p)
    return parser


#: Top-level commands in the order of ``--help``: name -> (help, the function that adds its arguments).


COMMANDS = {
    "demo": ("simulate a low-dose chest slice; write NRRD and PNG", _add_demo),
    "data": ("training data: simulate pairs, simulate low dose", _add_data),
    "train": ("train networks: denoisers, invariance models (cVAE, then cINN)", _add_train),
    "fit": ("your own denoiser: check it, fit its invariance models (cVAE + cINN), write a model folder for "
            "--model / the Slicer panel", _add_fit),
    "denoise": ("denoise a CT image or volume (slice by slice); write NRRD", _add_denoise),
    "sample": ("sample invariances x~ (f(x~) = f(x)) of a denoiser for the patch around a voxel; write NRRD, JSON "
               "and a PNG figure", _add_sample),
    "analyze": ("find the invariances that change anatomy (noise analysis, method A per invariance, method B "
                "against a noise-only null); write RESULTS_DIR/analysis/", _add_analyze),
    "gui": ("open the sampling panel as a standalone app (Qt)", _add_gui),
    "trust": ("let the code of an imported denoiser's model folder (TorchScript, MONAI bundle, Python class) run "
              "on this machine", _add_trust),
}


def _finish_bars() -> None:
    """End every progress bar still drawn, so that the error after it starts on a line of its own
    (and the bar is not drawn again, after the error, when Python collects it)."""
    from tqdm import tqdm

    for bar in list(tqdm._instances):  # tqdm's own registry of open bars
        bar.close()


def _given_options(command: str, words: List[str]) -> set:
    """The destinations of the options written in ``words`` (those not left at their defaults):
    the same parser with every default suppressed keeps only what was given."""
    parser = build_parser(command)
    parsers = [parser]
    for p in parsers:
        for action in p._actions:  # argparse keeps a parser's actions there; subcommands' parsers in choices
            if isinstance(action, argparse._SubParsersAction):
                parsers.extend(action.choices.values())
            elif action.dest != "help":
                action.default = argparse.SUPPRESS
    return set(vars(parser.parse_args(words))) - {"func"}


def _negative_voxels_joined(words: List[str]) -> List[str]:
    """``--center -5,10,1`` as ``--center=-5,10,1``: argparse would take the value for an
    option; joined, it reaches the centre's own check (which says where the image lies)."""
    joined = []
    for word in words:
        if joined and joined[-1] == "--center" and word[:1] == "-" and word[1:2].isdigit():
            joined[-1] = f"--center={word}"
        else:
            joined.append(word)
    return joined


class _Terminated(KeyboardInterrupt):
    """SIGTERM (a job's Cancel, ``timeout``, a scheduler), raised so that partly written
    outputs are removed as on Ctrl-C."""


def _terminate(signum, frame):
    raise _Terminated()


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of ``invariance-explorer`` and ``python -m InvarianceExplorerLib``."""
    words = _negative_voxels_joined(sys.argv[1:] if argv is None else list(argv))
    command = next((w for w in words if not w.startswith("-")), "")
    args = build_parser(command if command in COMMANDS else "").parse_args(words)
    args.given = _given_options(command, words)

    from ..io import CTInputError
    from ..progress import WARNING_PREFIX, Progress

    json_progress = getattr(args, "progress", None) == "json"
    shown = warnings.formatwarning, warnings.showwarning
    warnings.formatwarning = lambda message, *rest, **named: f"{WARNING_PREFIX}{message}\n"

    def show_warning(message, *rest, **named):  # a line of its own, not after a progress bar's
        from tqdm.auto import tqdm

        tqdm.write(f"{WARNING_PREFIX}{message}", file=sys.stderr)

    if sys.stderr.isatty():  # where bars are drawn; elsewhere warnings stay recordable (catch_warnings)
        warnings.showwarning = show_warning
    on_term = None
    if threading.current_thread() is threading.main_thread():
        on_term = signal.signal(signal.SIGTERM, _terminate)

    def input_error(exc: BaseException) -> int:  # the user's input or files: one clear line, no traceback
        _finish_bars()
        message = str(exc)
        if isinstance(exc, OSError) and exc.strerror and exc.filename:  # e.g. a folder that cannot be made
            message = f"{exc.filename}: {exc.strerror}; check the path and that it may be read (or written) there"
        if json_progress:
            from ..trusted_code import UntrustedCodeError

            untrusted = isinstance(exc, UntrustedCodeError)  # a panel asks, and trusts the folder
            Progress("json").error(message, kind="untrusted" if untrusted else "input",
                                   **({"folder": str(exc.folder)} if untrusted else {}))
        print(f"invariance-explorer: error: {message}", file=sys.stderr)
        return 2

    try:
        return int(args.func(args) or 0)
    except (CTInputError, ValueError, OSError) as exc:
        return input_error(exc)
    except KeyboardInterrupt as stop:
        _finish_bars()
        if json_progress:
            Progress("json").error("interrupted", kind="cancelled")
        terminated = isinstance(stop, _Terminated)
        print(f"invariance-explorer: {'terminated' if terminated else 'interrupted'}", file=sys.stderr)
        return 143 if terminated else 130
    except Exception as exc:  # a bug or a failing machine: programs reading JSON still get told
        cause = exc
        while isinstance(cause, RuntimeError) and cause.__cause__ is not None:
            cause = cause.__cause__
        if cause is not exc and isinstance(cause, (CTInputError, ValueError, OSError)):
            return input_error(cause)  # ours, wrapped by a library (MONAI's "applying transform ...")
        _finish_bars()
        if json_progress:
            Progress("json").error(f"{type(exc).__name__}: {exc}", kind="internal")
        raise
    finally:
        warnings.formatwarning, warnings.showwarning = shown
        if on_term is not None:
            signal.signal(signal.SIGTERM, on_term)


if __name__ == "__main__":
    raise SystemExit(main())
