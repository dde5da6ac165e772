"""Signs that a finished run went wrong, as warning lines for ``summary.json['warnings']``.

A run that finishes writes its outputs and exits normally even when its numbers are useless
(``trainer.lr=1e6``: a rollback, a log marginal likelihood of -2e16, test accuracy 0.10). These
checks read the summary and the history only and name what went wrong in words:

* **rollbacks**: non-finite values made the run restore an earlier state and lower a learning rate;
* **did not learn / diverged**: the last epoch's training NLL is above that of a uniform guess
  (``log C`` for ``C`` classes), or not finite;
* **chance accuracy**: the reported model's test accuracy is within two standard errors of ``1 / C``;
* **absurd log marginal likelihood**: below :data:`ABSURD_LOG_MARGLIK_PER_EXAMPLE` per example. A
  uniform guess scores ``-log C`` per example (-2.3 for ten classes) and the Occam factor of the
  runs in ``results/`` costs at most a few nats more (-1.2 to -4.4 per example there, the
  WRN-16-4 with 2.7M parameters on 512 images included), so a value a hundred nats per example
  lower comes from weights or precisions that diverged, not from a model worse at the data.
"""

from __future__ import annotations

import math
from typing import Any, Dict, List, Sequence

__all__ = ["run_warnings", "ABSURD_LOG_MARGLIK_PER_EXAMPLE"]

#: a selection value per example below this is reported as absurd (see the module docstring)
ABSURD_LOG_MARGLIK_PER_EXAMPLE = -100.0


def _rollback_warning(events: Sequence[Dict[str, Any]]) -> str:
    kinds = sorted({str(e.get("kind")) for e in events})
    first = events[0]
    return (f"{len(events)} rollback{'s' if len(events) != 1 else ''} after non-finite "
            f"{' and '.join(kinds)} values (first in epoch {first.get('epoch')}, {first.get('where')}): the run "
            f"restored earlier states and lowered the learning rates; its numbers come from the recovered run "
            f"(rollback_events in summary.json)")


def run_warnings(summary: Dict[str, Any], history: Sequence[Dict[str, Any]], num_classes: int) -> List[str]:
    """What went wrong in a finished run, one line each (empty: nothing noticed).

    Args:
        summary: the run's summary (the fields of :class:`marglik.tuning.reporting.RunSummary`;
            ``rollback_events``, ``test_accuracy``, ``test_size``, ``log_marglik_per_example`` are read).
        history: the run's epochs (``train_nll`` of the last one is read).
        num_classes: ``C``, the number of classes.

    Returns:
        One warning line per sign of trouble.
    """
    out: List[str] = []
    events = summary.get("rollback_events") or []
    if events:
        out.append(_rollback_warning(events))
    uniform = math.log(num_classes)
    last_nll = history[-1].get("train_nll") if history else None
    if last_nll is not None and (not math.isfinite(last_nll) or last_nll > uniform):
        out.append(f"the MAP training did not learn: the last epoch's training NLL ({last_nll:.3g}) is above a "
                   f"uniform guess's (log {num_classes} = {uniform:.3g}); the weights diverged or barely moved "
                   "(lower trainer.lr if it diverged, or train longer)")
    acc, n_test = summary.get("test_accuracy"), summary.get("test_size") or 0
    if acc is not None and n_test > 0:
        chance = 1.0 / num_classes
        margin = 2 * math.sqrt(chance * (1 - chance) / n_test)
        if acc <= chance + margin:
            out.append(f"test accuracy {acc:.3f} is at chance level (1/{num_classes} = {chance:.3f}, within two "
                       f"standard errors on {n_test} test examples): the reported model predicts nothing useful")
    lml = summary.get("log_marglik_per_example")
    if lml is not None and lml < ABSURD_LOG_MARGLIK_PER_EXAMPLE:
        out.append(f"log marginal likelihood {lml:.3g} per example is absurd (a uniform guess scores "
                   f"{-uniform:.3g}): the weights or prior precisions diverged, so the value selects nothing")
    return out
