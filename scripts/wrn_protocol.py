"""The WRN-16-4 study's protocol (a library module of ``scripts/``, no entry point): its arms, the
tuning config of one run and why each choice was made. ``run_wrn_marglik.py`` runs it;
``wrn_rotation_terms.py`` rebuilds its network from it.

``job_config`` takes the protocol options as attributes of ``args`` (``run_wrn_marglik.py``'s
command line; :data:`DEFAULTS` holds their defaults, :func:`default_args` a namespace of them).
"""

from __future__ import annotations

import argparse
from typing import Any, Dict, List, Tuple

#: the protocol options of ``run_wrn_marglik.py`` and their defaults
DEFAULTS: Dict[str, Any] = {
    "rotation": 90.0, "train_size": None, "epochs": 30, "batch_size": 32, "lr": 0.03, "n_samples": 4, "burn_in": 4,
    "frequency": 2, "steps": 3, "prior_prec_init": 1.0, "hyper_lr": 0.3, "aug_lr": 0.2, "marglik_batches": 2,
    "marglik_batch_size": 64, "selection_size": 512, "wandb": "disabled",
}

#: (augmentation, approx, copies_approx, number of seeds)
ARMS: List[Tuple[bool, str, str, int]] = [
    (True, "expand", "reduce", 3), (True, "reduce", "reduce", 3), (True, "expand", "expand", 1),
    (False, "expand", "reduce", 1), (False, "reduce", "reduce", 1),
]
PROTOCOL_NOTES = """
Why this protocol. *Task*: the digits are the only image data that ship with a package; rotating
each image by a fixed angle in [-90, 90] degrees makes rotation invariance a hyperparameter with a
known answer. *Input size 8x8* (native): WRN-16-4 then costs about 2 ms per image and SGD step on
one CPU thread, so 30 epochs with S = 4 augmented copies and the marglik updates fit the 20-minute
budget per run; the learned augmentation acts on the same 8x8 grid as the data's rotation (the
small-CNN invariance study, `results/invariance_digits.md`, learns the range there). *Fixup
WRN-16-4*: as in the paper (no BatchNorm, whose batch statistics the per-example Laplace curvature
does not model). Its non-zero layers use He initialisation with fan_in: with fan_out (the earlier
runs) the pooled features of the 1-channel input came out at ~1e-2 and neither SGD nor Adam left
chance level; Fixup's zero-initialised residual branches and classifier are kept. *SGD* (momentum
0.9, lr 0.03, cosine to 1e-6, batch 32, 30 epochs = 1,350 steps): the paper's optimiser; in pilots
lr 0.1 drove the scalar Fixup bias before the classifier negative and killed every feature within
20 steps, 0.01 learned more slowly than 0.03. *Prior*: layerwise, initial precision 1 (under SGD
the L2 term shrinks weights in proportion, unlike Adam, where a strong prior erased the
zero-initialised branches in the earlier runs). *Marglik*: after 4 burn-in epochs, every 2 epochs 3
hypersteps (13 updates, 39 hypersteps), each on 2 random batches of 64 images with S = 4 copies
(S = 2 with 32-image batches learned no rotation in a pilot: too little signal per step); Adam with
lr 0.3 on the log prior precisions and 0.2 on eta (radians) decayed by a cosine over the epochs after
burn-in (`hyper.schedule=cosine`, the same schedule family as the weights'): with a constant lr 0.1
a pilot's precisions were still rising by 0.1-0.2 in log per update when the weights' lr had run
out, so the last updates' movement below is bounded by the decayed step size as much as by
convergence -- the trajectories (rotation, mean log prior precision) are in the figure. The selection value is on a fixed subset of 512
images (`hyper.selection=subset`: the whole set costs ~3x more per update).
""".strip()




def default_args() -> argparse.Namespace:
    """The protocol options at their defaults (the committed study's)."""
    return argparse.Namespace(**DEFAULTS)


def job_config(args, aug: bool, approx: str, copies: str, seed: int) -> Dict[str, Any]:
    """The tuning config of one run (see :data:`PROTOCOL_NOTES`)."""
    return dict(
        data={"name": "digits", "rotation": float(args.rotation), "train_size": args.train_size, "seed": 0},
        model={"name": "wrn16_4", "norm": "fixup", "dropout": 0.0},
        curvature={"approx": approx, "copies_approx": copies, "fisher_type": "type-2"},
        hyper={"prior_structure": "layerwise", "prior_prec_init": args.prior_prec_init, "lr": args.hyper_lr,
               "aug_lr": args.aug_lr, "steps": args.steps, "frequency": args.frequency, "burn_in": args.burn_in,
               "schedule": "cosine", "augmentation": aug, "generators": ["rotation"],
               "n_samples": args.n_samples, "n_samples_test": args.n_samples,
               "marglik_batches": args.marglik_batches, "marglik_batch_size": args.marglik_batch_size,
               "selection": "subset", "selection_size": args.selection_size},
        trainer={"epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr, "lr_min": 1e-6,
                 "optimizer": "sgd", "momentum": 0.9, "schedule": "cosine", "seed": seed, "device": "cpu",
                 "num_threads": 1, "progress": False, "eval_every": 0, "eval_batch_size": 360,
                 "final_model": "best", "resume": "auto", "max_rollbacks": 10, "rollback_lr_factor": 0.5},
        logger={"mode": args.wandb, "group": f"wrn16_4-digits-rot{args.rotation:g}"},
    )
