"""The experiments, one readable script each (``torchlamb run NAME``): the MNIST experiments of Ben Mann's post "An
intuitive understanding of the LAMB optimizer" (2019) and of the paper (You et al. 2019), which ``torchlamb demo`` runs
together, and the longer MLM pre-training comparison, which runs alone."""

from . import adam_vs_lamb, batch_ramp, batch_sweep, critical_batch, lamb_lr, mlm

EXPERIMENTS = {"adam_vs_lamb": adam_vs_lamb, "lamb_lr": lamb_lr, "batch_sweep": batch_sweep,
               "critical_batch": critical_batch, "batch_ramp": batch_ramp}
# Run only by name: ``torchlamb run mlm`` (26 minutes on 2 cores), not by ``torchlamb demo``.
SEPARATE = {"mlm": mlm}
