"""Construction from a config, in one place: :class:`~marglik.tuning.Config` -> the run's parts.

:func:`setup_runtime` makes the process group and the device; :func:`build_parts` the data, the
model, the Laplace factory, the augmentation, the prior precision, both optimizers, the random
streams, the estimators (the hyperstep's subset, the selection set) and the parts that use them
(:mod:`marglik.tuning.parts`), with the settings and labels the driver
(:class:`~marglik.tuning.trainer.Trainer`) needs. A Python user may hand in their own model, data
or Laplace factory; the config then supplies only the rest.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
from torch import nn

from ..augment import AffineAugmentation
from ..data import load_dataset
from ..models import get_model
from .backends import build_laplace, check_backend_runs, resolved_separate_bias
from .config import Config, ConfigError
from .device import resolve_device
from .distributed import DistContext
from .estimator import MarglikSubset, SelectionSet
from .flavour_config import check_flavours
from .parts import (
    Augmenter,
    Evaluation,
    HyperStep,
    LaplaceFactory,
    LaplaceMarglik,
    MapStep,
    Parts,
    PriorPrecision,
    RandomStreams,
    RunLabels,
    Selection,
    TensorData,
    TrainerSettings,
    map_optimizer,
)
from .parts.hyperparams import sharing_eta
from .schedules import hyper_lr_factor, map_lr, marglik_update_due, selection_due
from .seeds import seed_everything


def as_config(cfg: Union[Config, Dict[str, Any], None]) -> Config:
    """A :class:`Config` from a config, a nested dict (:meth:`Config.from_dict`) or ``None`` (the defaults)."""
    if cfg is None:
        return Config()
    return cfg if isinstance(cfg, Config) else Config.from_dict(cfg)


def setup_runtime(cfg: Config) -> Tuple[DistContext, torch.device]:
    """Threads, the process group (``torchrun``) and this process's device.

    Args:
        cfg: the run configuration (``trainer.num_threads``, ``trainer.device``).

    Returns:
        ``(dist, device)``.

    Raises:
        ConfigError: a device this machine lacks.
    """
    if cfg.trainer.num_threads:
        torch.set_num_threads(int(cfg.trainer.num_threads))
    dist = DistContext.setup(cfg.trainer.device)
    return dist, dist.device(resolve_device(cfg.trainer.device))


def config_laplace_factory(curvature: Any) -> LaplaceFactory:
    """The Laplace factory of a config's ``curvature`` section (read when called, not copied).

    Args:
        curvature: the section (:func:`marglik.tuning.backends.build_laplace`).

    Returns:
        ``factory(model, prior_precision, differentiable)``.
    """
    return functools.partial(build_laplace, curvature)


def _check_shards(cfg: Config, dist: DistContext, n_data: int, sub: MarglikSubset) -> None:
    """Every global batch must give each rank at least one example."""
    k = dist.world_size
    sizes = {"trainer.batch_size": (cfg.trainer.batch_size, n_data % cfg.trainer.batch_size),
             "hyper.marglik_batch_size": (sub.batch_size, sub.size % sub.batch_size)}
    for key, (full, rest) in sizes.items():
        if full < k or 0 < rest < k:
            fix = (f"a batch size >= {k} whose last batch ({n_data} mod the batch size) is 0 or >= {k}"
                   if n_data >= k else f"more training examples than the {k} ranks (data.train_size)")
            raise ConfigError(key, full, f"with {n_data} training examples a batch of {min(full, rest or full)} "
                              f"is split over world_size={k} ranks and gives some rank no example",
                              f"{fix}, or fewer ranks (torchrun --nproc_per_node)")


def _load_data(cfg: Config, device: torch.device, datasets: Optional[Tuple[Any, Any, Dict[str, Any]]]) -> TensorData:
    d = cfg.data
    train, test, info = datasets or load_dataset(
        d.name, root=d.root, download=d.download, train_size=d.train_size, rotation=d.rotation,
        translation=d.translation, upsample=d.upsample, seed=d.seed,
    )
    return TensorData.from_datasets(train, test, info, device, name=d.name)


def _config_model(cfg: Config, info: Dict[str, Any], device: torch.device) -> nn.Module:
    c = cfg.model
    try:
        return get_model(c.name, info["in_channels"], info["num_classes"], info["image_size"], **c.kwargs).to(device)
    except (ValueError, AssertionError) as e:  # options that do not fit the data, e.g. a patch size
        size = info["image_size"]
        raise ConfigError("model", c.name, str(e) or type(e).__name__,
                          f"options of model {c.name} that fit {size}x{size} images") from e


def labels_of(cfg: Config, data: TensorData, model_name: str) -> RunLabels:
    """The summary's descriptive fields of a config.

    Args:
        cfg: the run configuration.
        data: the data (its name, when not the config's).
        model_name: the model's name.

    Returns:
        The labels.
    """
    c, own_data = cfg.curvature, data.name != cfg.data.name
    return RunLabels(
        data=data.name, rotation=0.0 if own_data else cfg.data.rotation,
        translation=0.0 if own_data else cfg.data.translation, model=model_name, approx=c.approx,
        copies_approx=c.copies_approx, backend=c.backend, structure=c.structure, fisher_type=c.fisher_type,
        separate_bias=resolved_separate_bias(c), prior_structure=cfg.hyper.prior_structure,
        seed=cfg.trainer.seed, burn_in=cfg.hyper.burn_in, warnings=cfg.warnings() + _size_warnings(cfg, data.N),
    )


def _size_warnings(cfg: Config, n: int) -> List[str]:
    """A MAP batch size larger than the training set: a warning, not an error -- the run is well defined
    (each epoch is one batch of all ``n`` examples, full-batch training) and one size of a sweep over
    ``data.train_size`` should not stop the others, but the step count is not what the user set.

    Args:
        cfg: the configuration.
        n: training examples.

    Returns:
        The message, if ``trainer.batch_size`` exceeds ``n`` (the Laplace fit's batch,
        ``hyper.marglik_batch_size``, is capped silently: its default exceeds small data sets).
    """
    size = cfg.trainer.batch_size
    if size <= n:
        return []
    return [f"trainer.batch_size={size} is larger than the training set ({n} examples): each epoch is one "
            f"batch of all {n} (one MAP step per epoch); lower trainer.batch_size to at most {n} for more steps"]


def build_parts(
    cfg: Union[Config, Dict[str, Any], None] = None,
    *,
    model: Optional[nn.Module] = None,
    data: Optional[TensorData] = None,
    laplace_factory: Optional[LaplaceFactory] = None,
    datasets: Optional[Tuple[Any, Any, Dict[str, Any]]] = None,
    runtime: Optional[Tuple[DistContext, torch.device]] = None,
) -> Parts:
    """The parts of a run from a config; any of model, data and Laplace factory may be the user's own.

    Args:
        cfg: a :class:`Config`, a nested dict, or ``None`` (the defaults).
        model: the network to tune (default: ``cfg.model``, built for the data); it must return
            logits ``(n, num_classes)`` for integer labels, and take ``(n, S, C, H, W)``
            augmented copies when ``hyper.augmentation`` is on.
        data: the training and test tensors (default: ``cfg.data`` loaded, or ``datasets``);
            moved to the run's device.
        laplace_factory: ``factory(model, prior_precision, differentiable)`` (default: from
            ``cfg.curvature``, :func:`config_laplace_factory`).
        datasets: ``(train, test, info)`` as :func:`marglik.data.load_dataset` returns them.
        runtime: ``(dist, device)`` from :func:`setup_runtime` (default: made here).

    Returns:
        The parts, settings and labels for :class:`marglik.tuning.trainer.Trainer`.

    Raises:
        ConfigError: model options that do not fit the data, a peer backend under ``torchrun``,
            batches that give some rank no example.
        BackendUnsupportedError: a peer backend cannot run the model.
        DataUnavailableError: data files missing or not downloadable.
    """
    c = as_config(cfg)
    dist, device = runtime or setup_runtime(c)
    if data is None:
        data = _load_data(c, device, datasets)
    else:
        data = TensorData(*(t.to(device) for t in (data.X, data.y, data.X_test, data.y_test)), data.info, data.name)
    N, info = data.N, data.info

    seed_everything(c.trainer.seed)
    own_model = model is not None
    model = model.to(device) if own_model else _config_model(c, info, device)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    if laplace_factory is None:
        check_backend_runs(c.curvature, model, (data.X[:2], data.y[:2]))  # a peer fails here, not mid-run
        if dist.world_size > 1 and c.curvature.backend != "marglik":
            raise ConfigError("curvature.backend", c.curvature.backend, "laplace-torch's peer backends do not "
                              "all-reduce their curvature over torchrun ranks", "marglik under torchrun (or run the "
                              "peer in one process)")
        check_flavours(c.curvature, model)
        laplace_factory = config_laplace_factory(c.curvature)
    h, t = c.hyper, c.trainer
    aug_on = bool(h.augmentation)
    if aug_on and data.X.dim() != 4:
        raise ConfigError("hyper.augmentation", True, f"the learned affine augmentation needs images (n, C, H, W); "
                          f"the training inputs have shape {tuple(data.X.shape)}", "hyper.augmentation=false")
    aug = AffineAugmentation(h.n_samples, generators=h.generators).to(device)
    aug_test = AffineAugmentation(h.n_samples_test or h.n_samples, generators=h.generators).to(device)
    prior = PriorPrecision(named, h.prior_structure, h.prior_prec_init, device)

    map_opt = map_optimizer(params, t)
    groups = [{"params": [prior.log_prior], "lr": h.lr, "base_lr": h.lr}]
    if aug_on:
        groups.append({"params": [aug.eta], "lr": h.aug_lr, "base_lr": h.aug_lr})
    hyper_opt = torch.optim.Adam(groups)

    streams = RandomStreams(t.seed)
    subset = MarglikSubset.from_config(c, N)
    selection_set = SelectionSet.from_config(c, N)
    batches_per_epoch = math.ceil(N / t.batch_size)
    if dist.enabled:
        _check_shards(c, dist, N, subset)
    net: nn.Module = model  # what the MAP steps call: the model, or its DDP wrapper
    if dist.enabled:
        from torch.nn.parallel import DistributedDataParallel

        ids = [device.index] if device.type == "cuda" else None
        net = DistributedDataParallel(model, device_ids=ids, output_device=ids[0] if ids else None)

    augmenter = Augmenter(aug, aug_test, aug_on, streams["aug"], dist, info.get("image_size"),
                          aug_train=sharing_eta(aug, h.train_samples or h.n_samples))
    laplace = LaplaceMarglik(laplace_factory, model, prior, differentiable=aug_on, sharded=dist.enabled)
    map_step = MapStep(net, map_opt, prior, augmenter, data, streams["data"], t.batch_size,
                       lr_at=lambda step: map_lr(c.trainer, step, batches_per_epoch), dist=dist)
    if h.batchwise and dist.world_size > 1:
        raise ConfigError("hyper.batchwise", True, "a batchwise gradient does not all-reduce over torchrun ranks",
                          "false under torchrun (each rank's fit is then smaller anyway)")
    hyper_step = HyperStep(model, prior, augmenter, laplace, subset, data, hyper_opt, streams["hyper"], h.steps,
                           lr_factor=lambda epoch: hyper_lr_factor(c.trainer, c.hyper, epoch), dist=dist,
                           batchwise=bool(h.batchwise), prior_steps=h.prior_steps)
    exact = not aug_on and subset.n_batches is None and c.curvature.fisher_type != "mc"
    selection = Selection(selection_set, laplace, model, prior, augmenter, data, exact, dist)
    evaluation = Evaluation(model, augmenter, data, t.seed, t.eval_batch_size, dist)
    settings = TrainerSettings(
        epochs=t.epochs, update_due=lambda e: marglik_update_due(c.hyper, e),
        selection_due=lambda e: selection_due(c.trainer, c.hyper, e), eval_every=t.eval_every,
        final_model=str(getattr(t.final_model, "value", t.final_model)), max_rollbacks=t.max_rollbacks,
        rollback_lr_factor=t.rollback_lr_factor, progress=t.progress, cost_reference=t.cost_reference,
    )
    labels = labels_of(c, data, type(model).__name__ if own_model else c.model.name)
    return Parts(data=data, model=model, prior=prior, augmenter=augmenter, streams=streams, laplace=laplace,
                 map_step=map_step, hyper_step=hyper_step, selection=selection, evaluation=evaluation,
                 settings=settings, labels=labels, dist=dist, device=device, config=c.to_dict())
