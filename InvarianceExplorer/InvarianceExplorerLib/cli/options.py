"""Command-line option types and checks that several commands share: numbers with bounds,
voxel centres, and output files and folders that must not take the user's files."""

from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path
from typing import Optional


def _whole_number(text: str, minimum: int = 0, maximum: Optional[int] = None) -> int:
    try:
        value = int(text)
    except ValueError:
        value = minimum - 1
    if value < minimum or (maximum is not None and value > maximum):
        meaning = "a positive whole number" if minimum == 1 else f"a whole number >= {minimum}"
        raise argparse.ArgumentTypeError(f"must be {meaning}{f' up to {maximum}' if maximum else ''}; got {text!r}")
    return value


def _positive_int(text: str) -> int:
    return _whole_number(text, 1)


def _at_most(maximum: int, minimum: int = 1):
    """An argparse type: a whole number from ``minimum`` to ``maximum`` (a bound that keeps
    a mistyped value from filling the memory)."""
    return lambda text: _whole_number(text, minimum, maximum)


def _seed(text: str) -> int:
    return _whole_number(text, 0, 2 ** 63 - 1)


def _positive_number(text: str, maximum: float = math.inf) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and 0 < value <= maximum):
        bound = f" up to {maximum:g}" if maximum < math.inf else ""
        raise argparse.ArgumentTypeError(f"must be a positive finite number{bound}; got {text!r}")
    return value


def _hyperparameter(text: str) -> tuple:
    """``NAME=VALUE`` -> (name, value); the value is read as JSON (numbers, lists), else kept as text."""
    name, sep, value = text.partition("=")
    if not sep or not name.strip():
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, e.g. disc_channels=32; got {text!r}")
    try:
        return name.strip(), json.loads(value)
    except json.JSONDecodeError:
        return name.strip(), value


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise argparse.ArgumentTypeError(f"not valid JSON ({error.msg}); give a JSON object such as "
                                         f"'{{\"width\": 8}}' (keys in double quotes); got {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"give a JSON object such as '{{\"width\": 8}}'; got {text!r}")
    return value


def _dose(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"dose is a fraction of full dose in (0, 1], e.g. 0.25 for quarter dose; "
                                         f"got {text!r}")
    return value


def _add_scan_options(p: argparse.ArgumentParser) -> None:
    from ..lowdose import FILTERS

    p.add_argument("--dose", type=_dose, default=0.25, help="dose fraction of full dose (default 0.25: quarter dose)")
    p.add_argument("--photons", type=_positive_number, default=None,
                   help="full-dose incident quanta per ray (default: simulator's)")
    p.add_argument("--filter", choices=FILTERS, default="hann", help="FBP apodisation filter (default hann)")
    p.add_argument("--device", default="cpu", help="torch device: cpu, cuda or auto (default cpu)")


def _add_progress(parser) -> None:
    """``--progress {bar,json,none}`` (and ``--no-progress`` = none): see :mod:`.progress`."""
    from ..progress import MODES

    parser.add_argument("--progress", choices=MODES, default="bar",
                        help="progress display: tqdm bar (default), JSON lines on stdout for programs, or none")
    parser.add_argument("--no-progress", action="store_const", const="none", dest="progress",
                        help="same as --progress none")


def _add_refinement(parser, which: str) -> None:
    parser.add_argument("--refine", default=None, metavar="CENTRE,SAMPLE",  # read by the engine's Refinement
                        help="consistency refinement: gradient steps that move the sampled invariances x~ towards "
                             "f(x~) = f(x), keeping what f does not pass on: CENTRE steps on the flow's centre, "
                             f"added to every sample, then SAMPLE steps on each (0,0: none); {which}")


def _existing_above(path: Path) -> Path:
    """The nearest existing folder above ``path`` (where it would be made: the filesystem root at most)."""
    return next(p for p in path.absolute().parents if p.exists())


def _check_output_file(output: Path, source: Path, what: str) -> None:
    """Before the work: ``output`` (of denoise, data lowdose) is a new .nrrd file, not the
    input, in a folder that can be written; ``CTInputError`` saying what to do otherwise."""
    from ..io import CTInputError

    if output.suffix.lower() != ".nrrd":
        raise CTInputError(output, "output must be a .nrrd file", "Choose a file name ending in .nrrd.")
    if source.exists() and output.exists() and source.resolve() == output.resolve():
        raise CTInputError(output, "output is the input file", f"Write the {what} to a new file.")
    if output.is_dir():
        raise CTInputError(output, "output is a folder", "Give a file name ending in .nrrd.")
    if output.exists() or output.is_symlink():
        raise CTInputError(output, "output already exists (it is not replaced)",
                           f"Write the {what} to a new file, or delete that one first.")
    folder = _existing_above(output)
    if not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK):
        raise CTInputError(output, f"cannot be written: {folder} is not a folder you can write to",
                           "Choose another output folder.")


def _center(text: str) -> tuple:
    """``"i,j,k"`` (or ``"i,j"``) -> a tuple of voxel indices."""
    try:
        values = tuple(int(v) for v in text.replace(" ", "").split(","))
    except ValueError:
        values = ()
    if len(values) not in (2, 3):
        raise ValueError(f"--center {text!r}: give the voxel as i,j,k (column, row, slice; 0-based), e.g. 256,200,0")
    return values


def _check_new_folder(out: Path, command: str, analyze: bool = False) -> None:
    """``out`` may become the folder ``command`` writes whole: it does not exist, or is an empty
    folder (``analyze``: ``sample --analyze``, whose earlier run may have stopped in its analysis)."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} is a file; give {command} the path of a new folder (--out)")
    if out.exists() and any(out.iterdir()):
        done = (out / "numbers.json").is_file() and not (out / "analysis" / "analysis.json").is_file()
        raise ValueError(f"{out}: the output folder already exists and is not empty; choose a new folder "
                         f"({command} writes it whole) or remove the old one"
                         + (f"; it holds samples without their analysis: `invariance-explorer analyze {out}` "
                            "analyses them" if done and analyze else ""))
    above = _existing_above(out)
    if not above.is_dir():
        raise ValueError(f"{above} is a file, so the folder {out} cannot be made; give {command} another --out")
    if not os.access(above, os.W_OK | os.X_OK):  # the folder is written beside, then moved in
        raise ValueError(f"{above} is not a folder you can write to, so {command} cannot make {out} there; give "
                         "another --out")


def _refuse_unused(args, options, needs: str) -> None:
    """``ValueError`` when any of ``options`` (destinations) was given although the run will not
    use it (``needs`` says what would): a setting silently ignored misleads."""
    unused = [f"--{name.replace('_', '-')}" for name in options if name in getattr(args, "given", ())]
    if unused:
        raise ValueError(f"{', '.join(unused)} {'has' if len(unused) == 1 else 'have'} no effect here: "
                         f"{'it is' if len(unused) == 1 else 'they are'} used only {needs}; leave "
                         f"{'it' if len(unused) == 1 else 'them'} out")
