"""Shared settings of the tests that fit tiny invariance models with ``fit``: cVAE and cINN a
few thousand parameters wide, 32-pixel patches, 200 cVAE steps (about 15-25 s on one CPU
thread), and their bars on the test split. C <= 0.8 shows the models were trained and wired
to the denoiser: the same models untrained give C of 0.96-0.98 (C = 1: the invariances
change f's output as much as the image), but 8 steps already give 0.71 (200 steps: 0.69),
so C alone cannot tell a fit that learned from one that barely ran. Where the data have full
dose, the noise power spectrum correlation of the reconstruction tells them apart: 0.70
after 8 steps, 0.84 after 200; its bar is 0.78. (Measured with these settings, CNN-10 as f.)"""

from __future__ import annotations

import torch

TINY = {"cvae": dict(z_dim=16, channels=[8, 16, 16, 32], critic_widths=[8, 8, 16, 16, 16, 16], critic_hidden=32,
                     lr=3e-3),
        "cinn": dict(n_flows=4, hidden=32, embedding_dim=8, embedding_channels=[8, 8], init_batches=2, lr=2e-3)}
FIT = dict(budget="200steps", device="cpu", seed=0, patch_size=32, batch_size=4, fidelity_slices=1,
           hyperparameters=TINY, progress=False)
MAX_CONSISTENCY = 0.8
MIN_NPS_CORRELATION = 0.78


def one_thread():
    """Body of a module-scoped autouse fixture: the module's fits run on one torch thread
    (deterministic sums, and the stated timings)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
