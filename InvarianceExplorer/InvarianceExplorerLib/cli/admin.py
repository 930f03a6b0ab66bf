"""``trust`` and ``gui``: letting an imported denoiser's code run, and the standalone panel."""

from __future__ import annotations

from pathlib import Path


def _add_trust(trust) -> None:
    """``trust``: let the code of an imported denoiser's model folder run here."""
    trust.add_argument("folder", type=Path, help="model folder of an imported denoiser (fit, or made elsewhere)")
    trust.set_defaults(func=_cmd_trust)


def _cmd_trust(args) -> int:
    from ..denoisers import CUSTOM, read_metadata, verify_weights
    from ..trusted_code import code_files, describe_code, trust

    if not args.folder.is_dir():
        from ..denoisers import DENOISERS

        raise ValueError(f"{args.folder}: no such model folder"
                         + ("; a bundled model holds weights only and needs no trust" if str(args.folder) in DENOISERS
                            else ""))
    metadata = read_metadata(args.folder.absolute())
    if metadata["architecture"]["name"] != CUSTOM:
        print(f"{args.folder}: a {metadata['architecture']['name']} folder holds weights only and runs no code; "
              "there is nothing to trust")
        return 0
    for record in code_files(metadata).values():  # the files as recorded, unchanged
        verify_weights(args.folder, record)
    trust(args.folder, metadata)
    print(f"{args.folder}: its code ({describe_code(metadata)}) may now run on this machine")
    return 0


def _add_gui(gui) -> None:
    """``gui``: the sampling panel as a standalone app (needs the "gui" extra: Qt.py, PySide6)."""
    gui.add_argument("--input", type=Path, default=None, help="CT to start with (file or DICOM folder)")
    gui.add_argument("--results", type=Path, default=Path("results/gui"), help="where sample runs write their folders (default results/gui)")
    gui.add_argument("--open", type=Path, default=None, dest="open_folder", help="show this sample results folder")
    gui.set_defaults(func=_cmd_gui)


def _cmd_gui(args) -> int:
    try:
        from ..ui.app import main as app_main
    except ImportError as exc:
        raise ValueError(f"the GUI needs Qt.py and PySide6 ({exc}); install them with "
                         "`pip install 'invariance-explorer[gui]'`") from None
    import signal

    for stop in (signal.SIGINT, signal.SIGTERM):  # Qt's event loop runs no Python handler: stop as a program does
        signal.signal(stop, signal.SIG_DFL)
    return app_main(results_dir=args.results, open_folder=args.open_folder, input_path=args.input)
