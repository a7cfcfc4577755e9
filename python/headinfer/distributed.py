"""Several GPUs: heads split over ranks (tensor parallelism) and layers split over devices.

Two ways a transformers model spans GPUs, and what each means for the KV cache:

- Tensor parallelism (``from_pretrained(..., tp_plan="auto")`` under ``torchrun``): every rank
  runs every layer, but its attention modules compute only their share of the heads (the q, k,
  v projections are split column-wise, ``o_proj`` row-wise and all-reduced). Each rank's cache
  then holds its own kv heads only, planned against its own GPU and its share of the host.
  ``tp_split`` reads the split from the TP plan and checks it against the projections' local
  weight shards.
- ``device_map`` (accelerate, ``device_map="auto"``): each layer runs on one device. The cache
  keeps one store per device, holding the layers of that device (``layer_devices``,
  ``group_layers``).
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Sequence
from typing import Any

import torch

from .checks import check_size
from .sizes import parse_bytes

__all__ = [
    "SPLIT_STYLES",
    "budget_for",
    "check_gpu_budget",
    "group_layers",
    "is_main_rank",
    "layer_devices",
    "local_world_size",
    "placement",
    "rank_threads",
    "torchrun_world",
    "tp_split",
]

logger = logging.getLogger("headinfer")

#: TP styles of a projection whose output stays split over the ranks (each rank computes its
#: own heads); the others (``colwise_gather_output``, ``colwise_rep``, ...) gather it.
SPLIT_STYLES = ("colwise", "packed_colwise")


def local_world_size() -> int:
    """Processes of this job on this host: torchrun's ``LOCAL_WORLD_SIZE``, else the
    torch.distributed world size, else 1."""
    env = os.environ.get("LOCAL_WORLD_SIZE")
    if env and env.isdigit() and int(env) > 0:
        return int(env)
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return int(dist.get_world_size())
    return 1


def rank_threads() -> int:
    """This process's share of the cores it may run on, when several processes share a host."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(cores // local_world_size(), 1)


def _tp_size(model: torch.nn.Module) -> int:
    size = getattr(model, "_tp_size", None)
    return int(size) if isinstance(size, int) and size > 1 else 1


def _tp_plan(model: torch.nn.Module) -> dict[str, str]:
    plan = getattr(model, "_tp_plan", None)
    return dict(plan) if isinstance(plan, dict) else {}


def _style(plan: dict[str, str], name: str) -> str | None:
    """The TP style of module ``name`` (``model.layers.3.self_attn.k_proj``) in ``plan``, whose
    keys put ``*`` for layer numbers and may leave out the leading prefixes."""
    generic = re.sub(r"\.\d+(?=\.|$)", ".*", name)
    for key, style in plan.items():
        if generic == key or generic.endswith("." + key):
            return style
    return None


def _local_rows(proj: Any) -> int | None:
    """Output rows this process holds of a linear projection's weight (its local shard under
    TP: a DTensor's ``to_local()``, or a plain tensor already cut), ``None`` when the weight's
    shape does not say (a packed quantized weight)."""
    weight = getattr(proj, "weight", None)
    if weight is None or not isinstance(proj, torch.nn.Linear):
        return None
    local = weight.to_local() if hasattr(weight, "to_local") else weight
    if local.dim() != 2 or local.shape[1] != proj.in_features:
        return None
    return int(local.shape[0])


def tp_split(model: torch.nn.Module, modules: Sequence[torch.nn.Module]) -> tuple[int, str | None]:
    """Over how many ranks each attention module's heads are split, and why not when refused.

    Returns ``(split, None)``: ``split`` is 1 for a model without tensor parallelism (or whose
    plan gathers the projections' outputs, so that each rank's attention computes every head),
    else the TP size. Returns ``(1, reason)`` when the model is split in a way headinfer cannot
    hold (the query and key projections split differently, or local weight shards that do not
    match the plan).
    """
    size = _tp_size(model)
    if size == 1:
        return 1, None
    plan = _tp_plan(model)
    names = {id(m): n for n, m in model.named_modules()}
    splits = set()
    for m in modules:
        base = names.get(id(m), "")
        projs = ("q_proj", "k_proj", "v_proj") if hasattr(m, "k_proj") else ("qkv_proj",)
        styles = {p: _style(plan, f"{base}.{p}") for p in projs}
        split = {p: size if s in SPLIT_STYLES else 1 for p, s in styles.items()}
        if len(set(split.values())) != 1:
            return 1, (
                f"layer {m.layer_idx}: tensor parallelism splits its projections unevenly "
                f"({styles}): query, key and value heads must be split alike"
            )
        value = next(iter(split.values()))
        for p in projs:
            proj = getattr(m, p)
            rows = _local_rows(proj)
            if rows is not None and rows * value != proj.out_features:
                return 1, (
                    f"layer {m.layer_idx}: {p} holds {rows} of {proj.out_features} output rows "
                    f"on this rank, but its TP style {styles[p]!r} over {size} ranks means "
                    f"{proj.out_features // value}"
                )
        splits.add(value)
    if len(splits) > 1:
        return 1, f"tensor parallelism splits the heads of some layers only ({sorted(splits)})"
    return (splits.pop() if splits else 1), None


def layer_devices(modules: Sequence[torch.nn.Module]) -> list[torch.device] | None:
    """The device each attention module runs on (``None`` if any has no parameters).

    A module that accelerate offloads (its weights on ``meta`` or the CPU, moved in by a hook)
    runs on its hook's ``execution_device``.
    """
    devices = []
    for m in modules:
        hook = getattr(m, "_hf_hook", None)
        execution = getattr(hook, "execution_device", None)
        if execution is not None:
            devices.append(torch.device(execution))
            continue
        param = next(m.parameters(), None)
        if param is None:
            return None
        devices.append(param.device)
    return devices


def group_layers(devices: Sequence[torch.device]) -> list[tuple[torch.device, list[int]]]:
    """``(device, its layers)`` for each device, in the order devices first appear (``cuda:0``
    first for accelerate's maps); each list of layers ascending.

    >>> group_layers([torch.device("cuda:0"), torch.device("cuda:0"), torch.device("cuda:1")])
    [(device(type='cuda', index=0), [0, 1]), (device(type='cuda', index=1), [2])]
    """
    groups: dict[torch.device, list[int]] = {}
    for layer, device in enumerate(devices):
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        groups.setdefault(device, []).append(layer)
    return list(groups.items())


def check_gpu_budget(value: Any) -> int | dict[int, int] | None:
    """``gpu_budget`` as ``patch`` and ``HeadInferCache`` take it: ``None``; bytes for each
    GPU (an int or a size like ``"20GiB"``); or ``{device: bytes}`` per GPU, keyed by CUDA
    ordinal, ``"cuda:N"`` or ``torch.device``. Returns ``None``, bytes, or ``{ordinal: bytes}``.

    Raises:
        TypeError, ValueError: naming ``gpu_budget`` and the bad key or value.
    """
    if not isinstance(value, dict):
        return check_size(value, "gpu_budget")
    budgets: dict[int, int] = {}
    for key, size in value.items():
        index = _cuda_index(key)
        if index in budgets:
            raise ValueError(f"gpu_budget: device {key!r} given twice (cuda:{index})")
        budgets[index] = parse_bytes(size, f"gpu_budget[{key!r}]")
    return budgets


def _cuda_index(key: Any) -> int:
    if isinstance(key, bool):
        raise TypeError(f"gpu_budget: a device key must be a CUDA ordinal or name, got {key!r}")
    if isinstance(key, int):
        index = key
    else:
        try:
            device = torch.device(key)
        except (RuntimeError, TypeError, ValueError):
            raise TypeError(
                f"gpu_budget: a device key must be a CUDA ordinal or name, got {key!r}"
            ) from None
        if device.type != "cuda" or device.index is None:
            raise ValueError(f"gpu_budget: keys name one CUDA device each (cuda:N), got {key!r}")
        index = device.index
    if index < 0:
        raise ValueError(f"gpu_budget: a CUDA ordinal is >= 0, got {key!r}")
    return index


def budget_for(budget: int | dict[int, int] | None, device: torch.device) -> int | None:
    """The GPU budget of ``device`` (``None``: the default, its free memory).

    Raises:
        ValueError: ``budget`` is a dict without this device.
    """
    if not isinstance(budget, dict):
        return budget
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in budget:
        raise ValueError(
            f"gpu_budget: no budget for cuda:{index}, where layers of this model run (given "
            f"for {', '.join(f'cuda:{i}' for i in sorted(budget))})"
        )
    return budget[index]


def torchrun_world() -> int:
    """Processes of a ``torchrun`` launch (its ``WORLD_SIZE``); 1 outside one."""
    env = os.environ.get("WORLD_SIZE", "1")
    return int(env) if env.isdigit() and int(env) > 0 else 1


def is_main_rank() -> bool:
    """Whether this process prints and writes results: rank 0 of a launch, or no launch."""
    return os.environ.get("RANK", "0") == "0"


def _init_process_group() -> torch.device:
    dist = torch.distributed
    cuda = torch.cuda.is_available()
    device = torch.device("cpu")
    if cuda:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    return device


def placement(gpus: int | None) -> tuple[dict[str, Any], str | None]:
    """``from_pretrained`` keywords that spread a model over GPUs, and what they do.

    Under ``torchrun`` (``WORLD_SIZE > 1``): tensor parallelism over its processes, one GPU
    each (``tp_plan="auto"``; the process group is started here, nccl on GPUs, gloo on the
    CPU). Else, ``gpus > 1``: accelerate's ``device_map="auto"`` over GPUs ``0..gpus-1``, layers
    balanced between them. Else ``({}, None)``: the caller places the model on one device.

    Raises:
        ValueError: ``gpus`` disagrees with the torchrun launch, or this machine has fewer
            GPUs (the message says what to do instead).
    """
    world = torchrun_world()
    if world > 1:
        if gpus is not None and gpus != world:
            raise ValueError(
                f"gpus: {gpus} asked for under torchrun with {world} processes: tensor "
                f"parallelism runs one GPU per process; leave out --gpus, or launch with "
                f"--nproc-per-node {gpus}"
            )
        device = _init_process_group()
        try:
            from transformers.distributed import DistributedConfig
        except ImportError:  # transformers before DistributedConfig took the plan directly
            spread: dict[str, Any] = {"tp_plan": "auto"}
        else:
            spread = {"distributed_config": DistributedConfig(tp_plan="auto")}
        return spread, f"tensor parallelism over {world} processes (this one: {device})"
    if gpus is None or gpus == 1:
        return {}, None
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count < gpus:
        raise ValueError(
            f"gpus: {gpus} asked for, but torch sees {count} CUDA GPU(s) on this machine"
        )
    memory: dict[Any, int] = {i: torch.cuda.mem_get_info(i)[0] for i in range(gpus)}
    return {"device_map": "auto", "max_memory": memory}, f"layers over {gpus} GPUs (device_map)"
