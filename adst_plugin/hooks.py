"""Forward hooks that capture a submodule's output, with an explicit lifecycle.

Only :class:`FeatureTap` registers hooks. It registers one hook when it is created (never inside a forward
call, so ``torch.compile(..., fullgraph=True)`` traces straight through it) and :meth:`FeatureTap.remove`
drops it (safe to repeat; also on ``with`` exit and garbage collection).

The registered callable is a small :class:`Capture` that holds no reference to any module, and removal
finds it by identity, not through a handle. So a deep copy of the hooked model (``copy.deepcopy``, or
``export()``) carries a copy of the capture that :func:`strip_captures` removes, and removing or
collecting one copy never touches the other's hooks.

The capture stores the output as it is (not detached): whether the head's gradient reaches the model is
decided by the wrapper (``feature_grad``).
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

__all__ = ["Capture", "FeatureTap", "feature_channels", "resolve_module", "strip_captures"]


def resolve_module(model: nn.Module, path: str, where: str = "wrap_with_adst", keyword: str = "features") -> nn.Module:
    """``model.get_submodule(path)`` with an error that lists what exists.

    Args:
        keyword: the caller's argument that names ``path``, for the fix in the error message.
    """
    try:
        return model.get_submodule(path)
    except AttributeError:
        names = [name for name, _ in model.named_children()]
        raise ValueError(
            f"{where}: no submodule {path!r} in {type(model).__name__}; top-level children are {names}. "
            f"Pass {keyword}='<dotted.path>' to {where}, naming the module whose output the head should read "
            "(e.g. 'decoder', or 'decoder.blocks.2' for an smp Unet)."
        ) from None


def _convs(module: nn.Module | None) -> list[nn.Conv2d]:
    return [] if module is None else [m for m in module.modules() if isinstance(m, nn.Conv2d)]


def feature_channels(
    model: nn.Module, path: str, tapped: nn.Module, where: str = "wrap_with_adst", keyword: str | None = "in_channels"
) -> int:
    """Channels of ``tapped``'s output (``tapped = model.get_submodule(path)``), for smp models and plain modules.

    smp: the segmentation head's first conv reads the decoder output; otherwise the module's ``out_channels``
    or its last conv's.

    Args:
        keyword: the caller's argument that sets the channels, for the fix in the error message; None when the
            caller has none (the fix is then to tap another module).
    """
    head_convs = _convs(getattr(model, "segmentation_head", None))
    if path == "decoder" and head_convs:
        return head_convs[0].in_channels
    out_channels = getattr(tapped, "out_channels", None)
    if isinstance(out_channels, int):
        return out_channels
    tapped_convs = _convs(tapped)
    if tapped_convs:
        return tapped_convs[-1].out_channels
    fix = f"pass {keyword}=<C> to {where}" if keyword else "tap a module with an out_channels attribute or a conv"
    raise ValueError(f"{where}: cannot infer the channels of {path!r}'s output; {fix}")


class Capture:
    """The hook callable: keeps the hooked module's last output while ``active`` (the owner switches it)."""

    def __init__(self) -> None:
        self.output: Tensor | None = None
        self.active = True

    def __getstate__(self) -> dict[str, Any]:
        # A copy (deepcopy of the hooked model, export(), pickling) captures nothing yet.
        return {"output": None, "active": self.active}

    def __call__(self, module: nn.Module, args: Any, output: Any) -> None:
        if not self.active:
            return
        if isinstance(output, (tuple, list)):  # e.g. decoders returning several maps: the first is the mask path
            output = output[0]
        if not isinstance(output, Tensor) or output.ndim != 4:
            raise TypeError(
                f"FeatureTap: expected the hooked {type(module).__name__} to return a (B, C, H, W) tensor, "
                f"got {type(output).__name__}{tuple(output.shape) if isinstance(output, Tensor) else ''}"
            )
        self.output = output


def _hook_dicts(module: nn.Module) -> list[dict[int, Any]]:
    names = ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called")
    return [getattr(module, name) for name in names if hasattr(module, name)]


def _remove_capture(module: nn.Module, capture: Capture | None = None) -> int:
    """Remove ``capture`` (or every :class:`Capture`) from ``module``'s forward hooks; returns how many."""
    hooks = module._forward_hooks
    keys = [
        key for key, hook in hooks.items() if (hook is capture if capture is not None else isinstance(hook, Capture))
    ]
    for key in keys:
        for hook_dict in _hook_dicts(module):
            hook_dict.pop(key, None)
    return len(keys)


def strip_captures(model: nn.Module) -> int:
    """Remove every :class:`Capture` hook from ``model`` and its submodules; returns how many were removed."""
    return sum(_remove_capture(module) for module in model.modules())


class FeatureTap:
    """Capture the output of ``module`` on every forward while ``capture.active``.

    Args:
        module: the module to hook.

    Example:
        >>> tap = FeatureTap(model.decoder)
        >>> _ = model(x); feats = tap.pop()
        >>> tap.remove()
    """

    def __init__(self, module: nn.Module):
        self.module = module
        self.capture = Capture()
        self.attach()

    @property
    def attached(self) -> bool:
        """Whether the hook is registered."""
        return any(hook is self.capture for hook in self.module._forward_hooks.values())

    def attach(self) -> None:
        """(Re-)register the hook; a no-op when already attached."""
        if not self.attached:
            self.module.register_forward_hook(self.capture)

    def pop(self) -> Tensor | None:
        """Return the last captured output and forget it (so no graph is kept alive)."""
        output, self.capture.output = self.capture.output, None
        return output

    def remove(self) -> None:
        """Remove the hook and the captured tensor; safe to call repeatedly."""
        module, capture = getattr(self, "module", None), getattr(self, "capture", None)
        if module is None or capture is None:  # __init__ failed or was bypassed
            return
        _remove_capture(module, capture)
        capture.output = None

    def __enter__(self) -> FeatureTap:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def __del__(self) -> None:
        self.remove()
