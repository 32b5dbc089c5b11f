"""The model's training forward and backward replayed as CUDA graphs (`trainer.cuda_graphs: true`).

Eager PyTorch launches every kernel from the host; a model of many small kernels (the scanned linear and SSM mixers
at vision sizes) then waits on the host, not the GPU: on the H200 the eager gla-bi ViT step at 224 px took 92 ms
for 64 GPU ms (benchmarks/vision_speed.py --profile) and ran 1.5x faster as graphs (`--graphs`). The capture is
PyTorch's own, torch.cuda.make_graphed_callables, at the first training batch; the optimizer step, the loss and
everything else in the training step stay eager. A training batch of another shape (an epoch's smaller last
batch), evaluation, and CPU runs call the model eagerly. Lightning has no CUDA-graph option of its own; compiling
with Inductor's CUDA graphs (mode "reduce-overhead") would be the other route, at the cost of a compile.
"""

from __future__ import annotations

import warnings
from typing import Callable

import torch
from torch import Tensor, nn


class GraphedTraining:
    """Calls `model` on its inputs: as a CUDA-graph replay for training calls of the captured input shape."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.key: tuple | None = None
        self.graphed: Callable[..., Tensor] | None = None
        self.warned = False

    def __call__(self, *inputs: Tensor) -> Tensor:
        if not (self.model.training and torch.is_grad_enabled()):
            return self.model(*inputs)
        if not all(t.is_cuda for t in inputs):
            if not self.warned:
                warnings.warn("trainer.cuda_graphs: the inputs are not on a CUDA device; training runs eagerly", stacklevel=2)
                self.warned = True
            return self.model(*inputs)
        key = tuple((t.shape, t.dtype, t.device) for t in inputs)
        if self.graphed is None:
            self.graphed, self.key = self._capture(inputs), key
        if key != self.key:
            return self.model(*inputs)
        with _no_autocast_cache():
            return self.graphed(*inputs)

    def _capture(self, inputs: tuple[Tensor, ...]) -> Callable[..., Tensor]:
        """The graphed forward of the model for inputs shaped as `inputs` (the model itself keeps its own forward)."""
        with _no_autocast_cache():
            try:
                torch.cuda.make_graphed_callables(self.model, inputs, allow_unused_input=True)
            except Exception as exc:
                raise RuntimeError(
                    f"trainer.cuda_graphs: capturing the model on inputs {[tuple(t.shape) for t in inputs]} failed "
                    f"({type(exc).__name__}: {exc}); train with trainer.cuda_graphs: false"
                ) from exc
        # make_graphed_callables replaced the module's forward; calls of other shapes need the original one back.
        graphed = self.model.__dict__.pop("forward")
        if any(getattr(m, "aux_loss", None) is not None for m in self.model.modules()):
            raise RuntimeError("trainer.cuda_graphs: the model's blocks leave auxiliary losses (MoE balancing), which a "
                               "graph replay would not carry to the loss; train with trainer.cuda_graphs: false")  # fmt: skip
        return graphed


def _no_autocast_cache() -> torch.autocast:
    """Autocast as it is (dtype, on or off), with its weight-cast cache off: CUDA graphs require it."""
    enabled = torch.is_autocast_enabled("cuda")
    return torch.autocast("cuda", dtype=torch.get_autocast_dtype("cuda"), enabled=enabled, cache_enabled=False)
