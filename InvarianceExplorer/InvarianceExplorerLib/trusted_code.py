"""Which imported denoisers' code may run on this machine.

A model folder of an imported denoiser (:mod:`.custom_denoisers`) holds code that runs when
the folder is loaded: a TorchScript program, a MONAI bundle config (whose ``_target_`` and
``$`` expressions build and run Python objects), or a Python class (a copied ``network.py``,
or a module that is imported). Weights alone (safetensors) run nothing. So a folder's code
runs only when this machine trusts it: :func:`trust` records its :func:`code_key` (a
SHA-256 over the kind, the class and the SHA-256 of every code file, so an edited file is a
new key) in a per-user file, :func:`trust_file`. Importing your own denoiser
(:func:`~.custom_denoisers.import_denoiser`, ``fit``) trusts it; a folder made elsewhere is
trusted with ``invariance-explorer trust FOLDER`` after reading what it runs.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

#: Environment variable naming the trust file (default: :func:`trust_file`'s).
TRUST_ENV = "INVARIANCE_EXPLORER_TRUST"


class UntrustedCodeError(ValueError):
    """A model folder's code is not trusted on this machine; the message says how to trust it.
    ``folder``: that model folder."""

    def __init__(self, message: str, folder):
        super().__init__(message)
        self.folder = Path(folder)


def trust_file() -> Path:
    """``$INVARIANCE_EXPLORER_TRUST``, else ``$XDG_CONFIG_HOME`` (``~/.config``)
    ``/invariance-explorer/trusted_code.json``."""
    if os.environ.get(TRUST_ENV):
        return Path(os.environ[TRUST_ENV])
    config = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    return config / "invariance-explorer" / "trusted_code.json"


def code_files(metadata: dict) -> dict:
    """The code of an imported denoiser's metadata: ``{role: record}`` of the files that run
    (TorchScript program, bundle config and metadata, network.py)."""
    architecture = metadata["architecture"]
    files = dict(architecture.get("files", {}))
    if architecture.get("kind") == "torchscript":
        files["torchscript"] = metadata["weights"]["denoiser"]
    return files


def describe_code(metadata: dict) -> str:
    """What a folder runs, for messages: ``kind: its code files`` (or the module of its class)."""
    architecture = metadata["architecture"]
    runs = ", ".join(r["file"] for r in code_files(metadata).values()) or f"the module of {architecture.get('class')}"
    return f"{architecture.get('kind')}: {runs}"


def code_key(metadata: dict) -> str:
    """SHA-256 naming what an imported denoiser's folder runs: its kind, its class (a Python
    import path) and the SHA-256 of each code file (:func:`code_files`)."""
    architecture = metadata["architecture"]
    what = {"kind": architecture.get("kind"), "class": architecture.get("class"),
            "files": {role: record.get("sha256") for role, record in sorted(code_files(metadata).items())}}
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()


def _read() -> dict:
    path = trust_file()
    try:
        entries = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError):
        raise ValueError(f"{path}: the list of trusted denoiser code cannot be read; delete it, then trust your "
                         "model folders again (invariance-explorer trust FOLDER)") from None
    return entries if isinstance(entries, dict) else {}


def is_trusted(metadata: dict) -> bool:
    return code_key(metadata) in _read()


def trust(folder, metadata: dict) -> str:
    """Record that the code of the model folder ``folder`` (its checked ``metadata``) may run
    here; returns its key. The trust file is written whole (temporary file, then rename)."""
    from .io import write_json

    entries = _read()
    key = code_key(metadata)
    entries[key] = {"folder": str(Path(folder).absolute()), "kind": metadata["architecture"].get("kind"),
                    "class": metadata["architecture"].get("class"),
                    "files": sorted(r["file"] for r in code_files(metadata).values()),
                    "trusted": time.strftime("%Y-%m-%d %H:%M:%S")}
    path = trust_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, entries)
    return key


def require_trust(folder, metadata: dict) -> None:
    """:class:`UntrustedCodeError` unless the code of ``folder`` is trusted here."""
    if is_trusted(metadata):
        return
    raise UntrustedCodeError(
        f"{folder} holds code that runs when it loads ({describe_code(metadata)}), and this machine has "
        f"not been told to trust it. Load it only if you trust who made it: read those files, then run "
        f"`invariance-explorer trust {folder}` (or import the denoiser yourself with `fit`)", folder)
