"""Checks of a typed tuning config: value ranges, curvature combinations, warnings before a run,
and what stops a checkpoint from resuming under it.

Types and keys are :mod:`marglik.tuning.config_parsing`'s job (a :class:`~marglik.tuning.config.Config`
reaching these checks is well typed); here every failure is a :class:`ConfigError` naming the first
invalid key, its value and what is allowed. The functions take the config as their argument and
back :meth:`Config.validate`, :meth:`Config.warnings` and :meth:`Config.resume_diff`.
"""

from __future__ import annotations

import math
import re
from dataclasses import fields
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence

from ..augment import ALL_GENERATORS
from .backends import check_curvature_config
from .config_parsing import ConfigError, flatten, plain

if TYPE_CHECKING:
    from .config import Config


def validate_config(cfg: "Config") -> None:
    """Check value ranges and curvature combinations (types are checked by :meth:`Config.from_dict`).

    Args:
        cfg: the typed configuration.

    Raises:
        ConfigError: naming the first invalid key, its value and what is allowed.
    """

    def check(ok: bool, key: str, allowed: str) -> None:
        section, name = key.split(".")
        value = cfg.model.kwargs[name] if section == "model" else getattr(getattr(cfg, section), name)
        if isinstance(value, float) and not math.isfinite(value):  # inf passes "> 0": checked first
            raise ConfigError(key, value, "not a finite number", allowed.replace("a number", "a finite number"))
        if not ok:
            raise ConfigError(key, value, "invalid value", allowed)

    d, c, h, t = cfg.data, cfg.curvature, cfg.hyper, cfg.trainer
    check(d.train_size is None or d.train_size >= 1, "data.train_size", "an integer >= 1 or null")
    check(d.rotation >= 0, "data.rotation", "a number >= 0 (degrees)")
    check(d.translation >= 0, "data.translation", "a number >= 0 (pixels)")
    check(d.upsample is None or d.upsample >= 1, "data.upsample", "an integer >= 1 or null")
    if str(cfg.model.name) == "tv":
        from ..models.tv import torchvision_classifiers  # torchvision imported only for model=tv

        names = torchvision_classifiers()
        check(cfg.model.kwargs["arch"] in names, "model.arch", "a torchvision classifier: " + ", ".join(names))
    check(c.mc_samples >= 1, "curvature.mc_samples", "an integer >= 1")
    check(c.backend == "marglik" or c.approx != "auto", "curvature.approx",
          "expand or reduce with a laplace-torch backend (per-layer flavours: curvature.backend=marglik)")
    check(c.backend == "marglik" or not c.approx_layers, "curvature.approx_layers",
          "{} with a laplace-torch backend (per-layer flavours: curvature.backend=marglik)")
    check(h.prior_prec_init > 0, "hyper.prior_prec_init", "a number > 0")
    check(h.lr > 0, "hyper.lr", "a number > 0")
    check(h.aug_lr >= 0, "hyper.aug_lr", "a number >= 0")
    check(h.steps >= 1, "hyper.steps", "an integer >= 1")
    check(h.prior_steps >= 0, "hyper.prior_steps", "an integer >= 0")
    check(h.frequency >= 1, "hyper.frequency", "an integer >= 1")
    check(h.burn_in >= 0, "hyper.burn_in", "an integer >= 0")
    check(h.n_samples >= 1, "hyper.n_samples", "an integer >= 1")
    check(h.train_samples is None or h.train_samples >= 1, "hyper.train_samples", "an integer >= 1 or null")
    check(h.selection_every >= 1, "hyper.selection_every", "an integer >= 1")
    check(h.n_samples_test is None or h.n_samples_test >= 1, "hyper.n_samples_test", "an integer >= 1 or null")
    check(len(h.generators) >= 1, "hyper.generators", "a non-empty list of " + ", ".join(ALL_GENERATORS))
    check(h.marglik_batches is None or h.marglik_batches >= 1, "hyper.marglik_batches", "an integer >= 1 or null")
    check(h.marglik_batch_size is None or h.marglik_batch_size >= 1, "hyper.marglik_batch_size",
          "an integer >= 1 or null")
    check(h.selection_size >= 1, "hyper.selection_size", "an integer >= 1")
    check(not h.batchwise or c.backend == "marglik", "hyper.batchwise",
          "false with a laplace-torch backend (its fit keeps no factor sums to take the gradient through)")
    check(c.backend == "marglik" or c.fisher_type != "mc-root", "curvature.fisher_type",
          "type-2, mc or empirical with a laplace-torch backend (mc-root: curvature.backend=marglik)")
    check(t.epochs >= 0, "trainer.epochs", "an integer >= 0")
    check(t.batch_size >= 1, "trainer.batch_size", "an integer >= 1")
    check(t.lr > 0, "trainer.lr", "a number > 0")
    check(t.lr_min >= 0, "trainer.lr_min", "a number >= 0")
    check(0 <= t.momentum < 1, "trainer.momentum", "a number in [0, 1)")
    check(valid_device(t.device), "trainer.device", "auto, cpu, cuda, cuda:<index> or mps")
    check(t.num_threads is None or t.num_threads >= 1, "trainer.num_threads", "an integer >= 1 or null")
    check(t.eval_every >= 0, "trainer.eval_every", "an integer >= 0 (0: only at the end)")
    check(t.eval_batch_size >= 1, "trainer.eval_batch_size", "an integer >= 1")
    check(t.max_rollbacks >= 0, "trainer.max_rollbacks", "an integer >= 0")
    check(0 < t.rollback_lr_factor <= 1, "trainer.rollback_lr_factor", "a number in (0, 1]")
    for name in ("dropout", "attention_dropout"):
        if name in cfg.model.kwargs:
            check(0 <= cfg.model.kwargs[name] < 1, f"model.{name}", "a number in [0, 1)")
    for key in float_keys(cfg):  # every other number: finite
        check(True, key, "a finite number")
    try:  # combinations a curvature backend cannot compute (tuning.backends says which and why)
        check_curvature_config(c, h.augmentation)
    except ValueError as err:
        key = "curvature.separate_bias" if "separate_bias" in str(err) else "curvature.backend"
        value = c.separate_bias if key == "curvature.separate_bias" else c.backend
        raise ConfigError(key, value, str(err), "the fix the message names") from None


def float_keys(cfg: "Config") -> List[str]:
    """The dotted keys whose value is a float (sections and model options).

    Args:
        cfg: the typed configuration.

    Returns:
        ``section.key`` for every float field of the sections (in their order), then ``model.key``
        for every float model option.
    """
    sections = [f.name for f in fields(cfg) if f.name != "model"]
    keys = [f"{section}.{f.name}" for section in sections for f in fields(getattr(cfg, section))
            if isinstance(getattr(getattr(cfg, section), f.name), float)]
    return keys + [f"model.{k}" for k, v in cfg.model.kwargs.items() if isinstance(v, float)]


def valid_device(spec: str) -> bool:
    """Whether ``trainer.device`` is spelled as a device (not whether this machine has it).

    Args:
        spec: the value of ``trainer.device``.

    Returns:
        True for ``auto``, ``cpu``, ``mps``, ``cuda`` or ``cuda:<index>``.
    """
    return re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", spec) is not None


def run_warnings(cfg: "Config") -> List[str]:
    """Problems worth a warning line before a run starts.

    Args:
        cfg: the typed configuration.

    Returns:
        One message per problem (empty when none), e.g. that no tuning happens.
    """
    out = []
    if cfg.marglik_updates() == 0:
        h, t = cfg.hyper, cfg.trainer
        first = h.burn_in + h.frequency
        out.append(
            f"no hyperparameter tuning will happen: trainer.epochs={t.epochs} but the first marginal-likelihood "
            f"update is after epoch {first} (hyper.burn_in={h.burn_in} + hyper.frequency={h.frequency}); the "
            f"run only trains the weights. Raise trainer.epochs to >= {first} or lower hyper.burn_in"
        )
    return out


def resume_diff(cfg: "Config", other: Dict[str, Any], free: Sequence[str],
                implied: Optional[Dict[str, Any]] = None) -> List[str]:
    """What differs between a configuration and a checkpoint's, ignoring the keys under ``free``.

    Args:
        cfg: the configuration of the run now.
        other: a saved :meth:`Config.to_dict`.
        free: dotted keys (or sections) that may differ (:attr:`Config.RESUME_FREE`).
        implied: dotted keys added after a checkpoint may have been written, with the value such a
            checkpoint's run had without naming it (:attr:`Config.IMPLIED_BEFORE`).

    Returns:
        One ``"key: checkpoint <theirs> vs now <mine>"`` line per differing dotted key (empty:
        resumable).
    """
    out = []
    mine = flatten(cfg.to_dict())
    theirs = flatten(plain(other))
    for key, value in (implied or {}).items():  # a key the checkpoint predates: the behaviour it had then
        if key not in theirs and not any(k.startswith(key + ".") for k in theirs):
            theirs[key] = value
    for key in sorted(set(mine) | set(theirs)):
        if any(key == f or key.startswith(f + ".") for f in free):
            continue
        if mine.get(key, "<missing>") != theirs.get(key, "<missing>"):
            out.append(f"{key}: checkpoint {theirs.get(key, '<missing>')!r} vs now {mine.get(key, '<missing>')!r}")
    return out
