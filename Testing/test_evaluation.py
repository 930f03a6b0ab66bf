"""Held-out evaluation: noise in uniform regions, tables and model cards (small synthetic inputs)."""

from __future__ import annotations

import numpy as np
import pytest

from InvarianceExplorerLib.denoisers import read_metadata, resolve_model_folder
from InvarianceExplorerLib.evaluation import model_card, noise_std, quality_table, uniform_regions
from InvarianceExplorerLib.phantom import Label


def test_noise_std_pools_components_about_their_own_means():
    rng = np.random.default_rng(0)
    image = np.zeros((64, 64))
    mask = np.zeros((64, 64), bool)
    mask[5:25, 5:25] = mask[35:60, 30:60] = True
    image[5:25, 5:25] = 40 + rng.normal(0, 10, (20, 20))  # two structures of different mean HU,
    image[35:60, 30:60] = -100 + rng.normal(0, 10, (25, 30))  # the same noise
    assert noise_std(image, mask) == pytest.approx(10.0, rel=0.08)
    assert np.std(image[mask]) > 50  # a plain std would count the structures
    small = np.zeros_like(mask)
    small[0:3, 0:3] = True
    assert noise_std(image, small) is None  # components under MIN_COMPONENT_PX are ignored


def test_uniform_regions_are_eroded_label_masks():
    labels = np.zeros((40, 40), np.uint8)
    labels[10:30, 10:30] = Label.HEART
    regions = uniform_regions(labels, erosion_px=3)
    assert regions["heart"].sum() == 14 * 14 and not regions["soft_tissue"].any()


def test_quality_table_rows():
    figures = {"low_dose": {"rmse_hu": 15.0, "psnr_db": 45.0, "ssim": 0.98, "noise_std_hu": {"heart": 30.0}},
               "cnn10": {"rmse_hu": 9.0, "psnr_db": 50.0, "ssim": 0.99, "rmse_reduction": 0.4,
                         "noise_std_hu": {"heart": 8.0}},
               "full_dose": {"noise_std_hu": {"heart": 15.0}}}
    table = quality_table({"figures": figures}).splitlines()
    assert len(table) == 5 and "| cnn10 | 9.0 | 40 % |" in table[3] and table[4].startswith("| full dose")


def test_model_card_says_only_what_a_training_record_holds():
    """A denoiser trained by another script (the planted benchmark's fine-tune) records fewer
    fields than `train denoiser`: its card leaves the rest out instead of printing None, and
    lists the fields it has no words for."""
    record = read_metadata(resolve_model_folder("redcnn"))
    record["training"] = {"scheme": "fine-tune on nodule-erased targets", "data": {"kind": "simulated",
                          "path": "data/erased", "pixel_spacing_mm": 0.7}, "steps": 1500, "batch_size": 16,
                          "lr": 3e-4, "wall_time_s": 3104.2, "machine": {"cpu": "AMD EPYC", "cpu_threads": 2,
                                                                         "torch": "2.13.0", "python": "3.11.7",
                                                                         "engine": "0.1.0, commit 1a2b3c4"}}
    card = model_card(record)
    training = card[card.index("## Training"):card.index("## Held-out figures")]
    assert "None" not in training
    assert "- data: simulated pairs `data/erased` at 0.7 mm\n" in training
    assert f"- 1500 steps, batch 16 patches of {record['patch_size']}² px, random flips/rotations\n" in training
    assert '- other training settings: `{"lr": 0.0003}`' in training
    assert "- optimiser" not in training and "- best epoch (lowest" not in training
    assert "- wall time 3104.2 s (AMD EPYC, 2 threads, torch 2.13.0, Python 3.11.7, engine 0.1.0, commit 1a2b3c4)" \
        in training
    full = model_card(read_metadata(resolve_model_folder("redcnn")))
    assert "split by patient" in full and "None" not in full


@pytest.mark.parametrize("name", ["cnn10", "redcnn", "wganvgg", "dugan"])
def test_bundled_model_cards_show_what_their_metadata_holds(name):
    """A card is its metadata rendered (a stale card would show other figures than the folder
    holds), and shows how much the samples differ, not only C (README, "What C does not
    show")."""
    folder = resolve_model_folder(name)
    metadata = read_metadata(folder)
    card = (folder / "MODEL_CARD.md").read_text()
    assert card == model_card(metadata)
    fidelity = metadata["invariance"]["fidelity"]
    assert "| spread consistency: " in card and "diversity as a fraction of it" in card
    assert f"; {fidelity['diversity']['relative']:.3f} |" in card and f"| {fidelity['spread']['consistency']:.3f}; " in card


def test_a_figure_names_the_engine_commit_that_made_it():
    """Model cards and benchmark tables record the engine's version and, from a git checkout
    (an editable install, as `make setup` makes), its commit, marked when its files differ."""
    import subprocess
    from pathlib import Path

    from InvarianceExplorerLib import __version__
    from InvarianceExplorerLib.devices import engine_version, machine

    engine = Path(engine_version.__code__.co_filename).parent
    head = subprocess.run(["git", "-C", str(engine), "rev-parse", "--short=7", "HEAD"], capture_output=True,
                          text=True, check=True).stdout.strip()
    changed = subprocess.run(["git", "-C", str(engine), "status", "--porcelain", "--untracked-files=no", "--",
                              str(engine.parent)], capture_output=True, text=True, check=True).stdout.strip()
    assert engine_version() == f"{__version__}, commit {head}" + (" + changes" if changed else "")
    assert machine()["engine"] == engine_version()
