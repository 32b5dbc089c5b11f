"""Task heads and LightningModules, chosen by `task.name`.

A task is a module that registers its config class with `@TASKS.register(NAME)` (mmeff.config.TASKS, whose
table names the module) and provides what `TaskContract` lists; `task_module(name)` checks it on first use.
"""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType
from typing import TYPE_CHECKING, Any, Protocol

from mmeff.config import TASKS, RunConfig
from mmeff.registry import contract_module

if TYPE_CHECKING:
    from torch import nn

    from mmeff.tasks.base import TaskModule


class TaskContract(Protocol):
    """What a task module provides besides its registered config class."""

    Task: type[TaskModule]  # the LightningModule: Task(cfg, model)

    def build_model(self, cfg: RunConfig) -> nn.Module:
        """The plain model (encoder + backbone + head) of run config `cfg`."""

    def make_transform(self, cfg: RunConfig, train: bool) -> Callable[[dict], Any]:
        """The per-sample transform (raw shard sample -> tensors) for training or evaluation."""


def task_module(name: str) -> ModuleType:
    """The module of task `name`, checked against `TaskContract`."""
    return contract_module(TASKS, name, TaskContract, "task (mmeff.tasks.TaskContract) for task.name")


def build_model(cfg: RunConfig) -> nn.Module:
    """The plain `nn.Module` (encoder + backbone + head) of run config `cfg`."""
    return task_module(cfg.task.name).build_model(cfg)


def build_task(cfg: RunConfig, model: nn.Module | None = None) -> TaskModule:
    """The LightningModule training `model` (built from `cfg` when not given)."""
    return task_module(cfg.task.name).Task(cfg, model if model is not None else build_model(cfg))


def transforms(cfg: RunConfig) -> tuple[Callable[[dict], Any], Callable[[dict], Any]]:
    """(train, eval) per-sample transforms of run config `cfg`."""
    module = task_module(cfg.task.name)
    return module.make_transform(cfg, True), module.make_transform(cfg, False)
