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

#: (augmentation, approx, copies_approx, number of seeds or a tuple of seeds)
ARMS: List[Tuple[bool, str, str, int]] = [
    (True, "expand", "reduce", 3), (True, "reduce", "reduce", 3), (True, "expand", "expand", 1),
    (False, "expand", "reduce", 1), (False, "reduce", "reduce", 1),
]

#: ``curvature.approx`` labels of per-layer assignments: label -> (base flavour, ``approx_layers``)
MIXED: Dict[str, Tuple[str, Dict[str, str]]] = {"reduce[block2=expand]": ("reduce", {"block2": "expand"})}
#: ablation labels: label -> (flavour, overrides of the protocol's config): one change of the lean
#: protocol each, to attribute what it learns (not flavours: not in the hyperstep timing)
ABLATIONS: Dict[str, Tuple[str, Dict[str, Dict[str, Any]]]] = {
    "reduce[type-2]": ("reduce", {"curvature": {"fisher_type": "type-2"}}),
    "reduce[train-S]": ("reduce", {"hyper": {"train_samples": None}}),
}

#: the run protocols: ``study`` (the committed study, type-2 fits, training on the S copies) and
#: ``lean`` (issue #28's default protocol applied to the study: mc-root fits, MAP steps on one
#: copy, one hyperstep every epoch; everything else as the study), with their arms
PROTOCOLS: Dict[str, Dict[str, Any]] = {
    "study": {"fisher_type": "type-2", "train_samples": None, "frequency": 2, "steps": 3, "arms": ARMS},
    "lean": {"fisher_type": "mc-root", "train_samples": 1, "frequency": 1, "steps": 1,
             "arms": [(True, "expand", "reduce", 3), (True, "reduce", "reduce", 3),
                      (True, "reduce[block2=expand]", "reduce", 3),
                      # ablations on seed 1 (where the study's reduce-reduce learned 2.5 degrees)
                      (True, "reduce[type-2]", "reduce", (1,)), (True, "reduce[train-S]", "reduce", (1,))]},
}
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




LEAN_NOTES = """
The lean protocol (`--protocol lean`, issue #28's default run protocol on this study): Monte-Carlo
GGN fits (`curvature.fisher_type=mc-root`: one backward pass of the loss Hessian's root times random
signs per hyperstep instead of type-2's C - 1 = 9), MAP steps on one augmented copy (`hyper.train_samples=1`; the fits and the test predictions
keep S = 4), one hyperstep every epoch after the burn-in (26 hypersteps instead of 39); batches,
learning rates, schedule and selection as the study. Third arm: reduce-reduce with stage 2 expanded
(`curvature.approx=reduce +curvature.approx_layers={block2:expand}`), the per-layer assignment of
`results/reduce_invariance.md` that keeps 66% of expand's log-det reward at 1.05x reduce-reduce's
hyperstep cost. Ablations of reduce-reduce on seed 1 (where the study's reduce-reduce learned 2.5
degrees), one change back towards the study each: `reduce[type-2]` (the type-2 GGN) and
`reduce[train-S]` (MAP steps on the S = 4 copies).
""".strip()


def default_args() -> argparse.Namespace:
    """The protocol options at their defaults (the committed study's)."""
    return argparse.Namespace(**DEFAULTS, protocol="study")


def protocol_of(args) -> Dict[str, Any]:
    """The run protocol named by ``args.protocol`` (``study`` where absent)."""
    return PROTOCOLS[getattr(args, "protocol", "study")]


def job_config(args, aug: bool, approx: str, copies: str, seed: int) -> Dict[str, Any]:
    """The tuning config of one run (see :data:`PROTOCOL_NOTES`). ``approx`` is a flavour, a label
    of :data:`MIXED` (a per-layer assignment) or of :data:`ABLATIONS`."""
    proto = protocol_of(args)
    approx, extra = ABLATIONS.get(approx, (approx, {}))
    approx, layers = MIXED.get(approx, (approx, {}))
    curvature = {"approx": approx, "copies_approx": copies, "fisher_type": proto["fisher_type"]}
    if layers:
        curvature["approx_layers"] = dict(layers)
    cfg = dict(
        data={"name": "digits", "rotation": float(args.rotation), "train_size": args.train_size, "seed": 0},
        model={"name": "wrn16_4", "norm": "fixup", "dropout": 0.0},
        curvature=curvature,
        hyper={"prior_structure": "layerwise", "prior_prec_init": args.prior_prec_init, "lr": args.hyper_lr,
               "aug_lr": args.aug_lr, "steps": args.steps, "frequency": args.frequency, "burn_in": args.burn_in,
               "schedule": "cosine", "augmentation": aug, "generators": ["rotation"],
               "n_samples": args.n_samples, "n_samples_test": args.n_samples,
               "train_samples": proto["train_samples"],
               "marglik_batches": args.marglik_batches, "marglik_batch_size": args.marglik_batch_size,
               "selection": "subset", "selection_size": args.selection_size},
        trainer={"epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr, "lr_min": 1e-6,
                 "optimizer": "sgd", "momentum": 0.9, "schedule": "cosine", "seed": seed, "device": "cpu",
                 "num_threads": 1, "progress": False, "eval_every": 0, "eval_batch_size": 360,
                 "final_model": "best", "resume": "auto", "max_rollbacks": 10, "rollback_lr_factor": 0.5},
        logger={"mode": args.wandb, "group": f"wrn16_4-digits-rot{args.rotation:g}"},
    )
    for section, values in extra.items():
        cfg[section].update(values)
    return cfg
