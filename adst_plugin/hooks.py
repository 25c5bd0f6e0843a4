"""Forward hooks that capture a submodule's output, with an explicit lifecycle.

Only :class:`FeatureTap` registers hooks; every handle is kept and :meth:`FeatureTap.remove` drops them
all (safe to repeat). Captured tensors are not detached, so auxiliary losses reach the model.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

__all__ = ["FeatureTap", "resolve_module"]


def resolve_module(model: nn.Module, path: str) -> nn.Module:
    """``model.get_submodule(path)`` with an error that lists what exists."""
    try:
        return model.get_submodule(path)
    except AttributeError:
        names = [name for name, _ in model.named_children()]
        raise ValueError(
            f"wrap_with_adst: no submodule {path!r} in {type(model).__name__}; top-level children are {names}. "
            "Pass features='<dotted.path>' naming the module whose output the head should read."
        ) from None


class FeatureTap:
    """Capture the output of ``module`` on every forward.

    Args:
        module: the module to hook.

    Example:
        >>> tap = FeatureTap(model.decoder)
        >>> _ = model(x); feats = tap.pop()
        >>> tap.remove()
    """

    def __init__(self, module: nn.Module):
        self.module = module
        self.handles: list[RemovableHandle] = []
        self.output: Tensor | None = None
        self.attach()

    def attach(self) -> None:
        """(Re-)register the hook; a no-op when already attached."""
        if not self.handles:
            self.handles.append(self.module.register_forward_hook(self._hook))

    def _hook(self, module: nn.Module, args: Any, output: Any) -> None:
        if isinstance(output, (tuple, list)):  # e.g. decoders returning several maps: the first is the mask path
            output = output[0]
        if not isinstance(output, Tensor) or output.ndim != 4:
            raise TypeError(
                f"FeatureTap: expected the hooked {type(module).__name__} to return a (B, C, H, W) tensor, "
                f"got {type(output).__name__}{tuple(output.shape) if isinstance(output, Tensor) else ''}"
            )
        self.output = output

    def pop(self) -> Tensor | None:
        """Return the last captured output and forget it (so no graph is kept alive)."""
        output, self.output = self.output, None
        return output

    def remove(self) -> None:
        """Remove every hook handle and captured tensor; safe to call repeatedly."""
        handles = getattr(self, "handles", [])  # may be absent if __init__ failed or was bypassed
        for handle in handles:
            handle.remove()
        handles.clear()
        self.output = None

    def __enter__(self) -> FeatureTap:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def __del__(self) -> None:
        self.remove()
