"""One training forward, then its loss: the hand-over between a wrapper and the loss that takes its head's output.

A training forward (grad enabled) keeps the head's output together with that forward's mask logits on the wrapper;
the loss takes both once. Two checks keep a step's head output from going astray:

- **The pairing** (:func:`comes_from`): the logits the loss got must be the kept forward's output, or computed from
  it (a slice, ``.contiguous()``, ``.float()``, DDP's output sink): their autograd graph reaches the kept output's
  node within :data:`GRAPH_STEPS` nodes. Logits without a graph (a frozen model) must share the kept output's
  storage (views pass, copies do not). A forward under ``torch.no_grad()`` keeps nothing and leaves the kept
  output alone, so an EMA or pseudo-label forward between a forward and its loss is harmless.
- **The forgotten loss** (:func:`warn_unclaimed`): a training forward that finds the previous one's head output
  never taken warns once (:class:`UnclaimedHeadOutputWarning`): the usual cause is a loss built without the model
  (``ADSTLoss()``, or a plain loss), which trains the mask loss alone while the head gets no gradient.

Under ``torch.compile(fullgraph=True)`` dynamo cannot trace ``warnings.warn``; :func:`warn_unclaimed` is registered
as a logging function, which dynamo calls after the compiled graph instead.
"""

from __future__ import annotations

import warnings
from collections import deque

from torch import Tensor

__all__ = [
    "GRAPH_STEPS",
    "WARNS_WHEN_COMPILED",
    "UnclaimedHeadOutputWarning",
    "comes_from",
    "mismatch_message",
    "warn_unclaimed",
]

#: Autograd nodes the pairing check visits at most, from the loss's logits back towards the kept output.
GRAPH_STEPS = 64


class UnclaimedHeadOutputWarning(UserWarning):
    """A training forward's head output was never taken by its loss, so the head got no gradient from it."""


def warn_unclaimed(where: str, loss: str) -> None:
    """Warn that the previous training forward's head output was never taken by ``loss``."""
    warnings.warn(
        f"{where}: the head output of the previous training forward was never taken by a loss, so the head gets "
        f"no gradient. Build the loss with the model, {loss}(model) (not {loss}() or a plain loss), and call it "
        "once after each training forward with that forward's output; run forwards that need no loss under "
        "torch.no_grad() or in eval mode.",
        UnclaimedHeadOutputWarning,
        stacklevel=2,
    )


def _register_with_dynamo() -> bool:
    try:
        import torch._dynamo  # already imported by segmentation_models_pytorch

        torch._dynamo.config.reorderable_logging_functions.add(warn_unclaimed)
    except (ImportError, AttributeError):  # pragma: no cover - older torch: no warning from compiled code
        return False
    return True


#: Whether :func:`warn_unclaimed` may be called from compiled code.
WARNS_WHEN_COMPILED = _register_with_dynamo()


def comes_from(logits: Tensor, output: Tensor) -> bool:
    """Whether ``logits`` is ``output`` or was computed from it (see the module docstring for what is checked)."""
    if logits is output:
        return True
    target = output.grad_fn
    if target is None:  # no autograd graph: only a view of the output shares its storage
        return logits.untyped_storage().data_ptr() == output.untyped_storage().data_ptr()
    queue, seen = deque([logits.grad_fn]), set()
    while queue and len(seen) < GRAPH_STEPS:  # breadth first: the output is a node or two away
        node = queue.popleft()
        if node is None or node in seen:
            continue
        if node is target:
            return True
        seen.add(node)
        queue.extend(parent for parent, _ in node.next_functions)
    return False


def mismatch_message(where: str, logits: Tensor) -> str:
    """The error of a loss call whose logits are not the output of the forward whose head output it took."""
    got = "logits without an autograd graph" if logits.grad_fn is None else "logits of another forward"
    return (
        f"{where}: expected the output of the model's last training forward (or a slice, copy or cast of it), "
        f"got {got}. Call the loss once after each training forward, with that forward's output; run extra "
        "forwards (an EMA teacher, consistency targets) under torch.no_grad() or in eval mode."
    )
