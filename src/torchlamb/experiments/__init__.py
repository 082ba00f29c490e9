"""The MNIST experiments of the seeds and the paper, one readable script each (``torchlamb run NAME``)."""

from . import adam_vs_lamb, batch_sweep, lamb_lr

EXPERIMENTS = {"adam_vs_lamb": adam_vs_lamb, "lamb_lr": lamb_lr, "batch_sweep": batch_sweep}
