"""Training on many devices through Lightning: `trainer.strategy: fsdp` is FSDP2 (`fully_shard`, one unit per
backbone layer) in Lightning's ModelParallelStrategy, with atomic sharded checkpoints and full weights gathered for
an export."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.tensor import DTensor

from mmeff.backbone import Layer
from mmeff.config import FSDPConfig

PARTIAL = ".partial"  # suffix of a checkpoint being written: `.<name>.partial` beside its target


class FSDP(ModelParallelStrategy):
    """FSDP2 over all ranks (no tensor parallelism): each backbone `Layer` is one shard unit, the rest of the model
    (encoder, head, final norm) the root unit.

    Lightning's ModelParallelStrategy rather than its FSDPStrategy: the latter wraps modules in FSDP1, which flattens
    each unit's weights into one FlatParameter and which PyTorch has superseded by FSDP2. FSDP2 shards each parameter
    on its own (a DTensor), hands every layer its own whole parameters during its forward and backward, casts per
    unit, and its state dicts are what torch.distributed.checkpoint reshards for a resume on another rank count.
    """

    def __init__(self, cfg: FSDPConfig, **kwargs: Any) -> None:
        super().__init__(save_distributed_checkpoint=cfg.sharded_checkpoint, **kwargs)
        self.fsdp = cfg

    def setup_environment(self) -> None:
        self._data_parallel_size = self.num_nodes * self.num_processes
        self._tensor_parallel_size = 1
        super().setup_environment()

    def shard(self, model: nn.Module) -> None:
        """Shard `model` over the data-parallel ranks (`shard_model`)."""
        shard_model(model, self.device_mesh["data_parallel"], self.fsdp)

    def model_to_device(self) -> None:
        # fully_shard has put every parameter and buffer it manages on its device; moving the module again would
        # pull CPU-offloaded shards onto the GPU. Only what is outside the sharded model (task buffers) moves.
        assert self.model is not None
        if not self.fsdp.cpu_offload:
            return super().model_to_device()
        for module in self.model.modules():
            for name, buffer in module.named_buffers(recurse=False):
                setattr(module, name, buffer.to(self.root_device))

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any = None) -> None:
        """Write a sharded checkpoint folder beside its target, then rename it into place (rank 0), so that a kill
        keeps the previous one whole."""
        if not self._save_distributed_checkpoint:
            return super().save_checkpoint(checkpoint, filepath, storage_options)
        path = Path(self.broadcast(str(filepath)))
        tmp = path.with_name(f".{path.name}{PARTIAL}")
        if self.is_global_zero:
            shutil.rmtree(tmp, ignore_errors=True)
        self.barrier()
        super().save_checkpoint(checkpoint, tmp, storage_options)
        self.barrier()
        if self.is_global_zero:
            replace_folder(tmp, path)
        self.barrier()


def shard_model(model: nn.Module, mesh: Any, cfg: FSDPConfig) -> None:
    """Apply `fully_shard` over `mesh` to each backbone layer of `model`, then to `model` itself (idempotent).

    Inside a unit's forward and backward its parameters are whole plain tensors (FSDP2 gathers them first), so the
    Triton and grouped-GEMM paths see what they see on one device.
    """
    from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    if isinstance(model, FSDPModule):
        return
    param, reduce = (getattr(torch, d) if d else None for d in (cfg.param_dtype, cfg.reduce_dtype))
    options: dict[str, Any] = dict(
        mesh=mesh,
        reshard_after_forward=cfg.reshard_after_forward,
        # Pinned host memory for fast copies to a GPU; a CPU mesh (tests) has no device to pin for.
        offload_policy=CPUOffloadPolicy(pin_memory=mesh.device_type == "cuda") if cfg.cpu_offload else OffloadPolicy(),
    )
    for module in model.modules():
        if isinstance(module, Layer):
            fully_shard(module, mp_policy=MixedPrecisionPolicy(param, reduce), **options)
    # The root's outputs (logits) in float32, so that every task's loss is computed in float32. FSDP keeps the root's
    # weights gathered from its forward to its backward (not resharded after forward), so methods a task calls after
    # a forward (a captioner's encode_media and head while sampling in validation) find them whole.
    fully_shard(model, mp_policy=MixedPrecisionPolicy(param, reduce, output_dtype=torch.float32), **options)


def replace_folder(src: Path, dst: Path) -> None:
    """Put folder `src` at `dst` by renames: an older `dst` (file or folder) is moved aside first, deleted last."""
    old = dst.with_name(f".{dst.name}.old")
    if dst.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(dst, old)
    os.replace(src, dst)
    if old.is_dir():
        shutil.rmtree(old, ignore_errors=True)
    else:
        old.unlink(missing_ok=True)


def is_sharded(module: nn.Module) -> bool:
    """Whether `module` holds parameters sharded over ranks (DTensors of FSDP2)."""
    return any(isinstance(p, DTensor) for p in module.parameters())


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of `t` (`t` itself unless it is a DTensor)."""
    return t.to_local() if isinstance(t, DTensor) else t


def full_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """The full (unsharded) state of `module` on CPU: gathered from every rank when sharded (call it on all ranks;
    ranks other than 0 get an empty dict), else its own state_dict."""
    if not is_sharded(module):
        return module.state_dict()
    return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def is_sharded_checkpoint(path: str | Path) -> bool:
    """Whether `path` is a sharded checkpoint folder (torch.distributed.checkpoint files + Lightning's meta.pt)."""
    path = Path(path)
    return path.is_dir() and (path / ".metadata").is_file() and (path / "meta.pt").is_file()


def read_sharded_weights(path: str | Path, like: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The model tensors named in `like` (a plain module's state_dict, filled in place) from sharded checkpoint
    `path`, read in this process alone whatever the rank count that wrote it."""
    import torch.distributed.checkpoint as dcp

    state = {"state_dict": like}
    dcp.load(state, checkpoint_id=str(path), no_dist=True)
    return state["state_dict"]
