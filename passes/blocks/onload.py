"""A model's weights on demand: the skeleton on the meta device, one module's tensors loaded from
the checkpoint onto the compute device, and sent back to the meta device when done.

Only real buffers (rotary tables computed at construction) live outside the checkpoint; they
follow the compute device.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from llmrank.passes.blocks.checkpoint import Checkpoint


def skeleton(folder: Path, dtype: torch.dtype) -> nn.Module:
    """The model with every parameter on the meta device and real buffers (rotary tables)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(folder)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.tie_weights()  # a tied head shares the embeddings' parameter, so loading one loads both
    return model.eval()


def materialise(module: nn.Module, prefix: str, ckpt: Checkpoint, device: torch.device, dtype: torch.dtype) -> None:
    """Give ``module``'s parameters and persistent buffers their checkpoint values (keys ``prefix + name``)."""
    names = list(module.state_dict().keys())
    tensors = ckpt.read([prefix + n for n in names])
    state = {n: tensors[prefix + n].to(device=device, dtype=dtype if tensors[prefix + n].is_floating_point() else None)
             for n in names}
    module.load_state_dict(state, strict=True, assign=True)
    for p in module.parameters():
        p.requires_grad_(False)
    buffers_to(module, device)


def buffers_to_own(module: nn.Module, device: torch.device) -> None:
    for name, buf in module._buffers.items():
        if buf is not None and not buf.is_meta and buf.device != device:
            module._buffers[name] = buf.to(device)


def buffers_to(module: nn.Module, device: torch.device) -> None:
    """Move the real (non-meta) buffers, e.g. rotary tables built at construction, to ``device``."""
    for m in module.modules():
        for name, buf in m._buffers.items():
            if buf is not None and not buf.is_meta and buf.device != device:
                m._buffers[name] = buf.to(device)


def to_meta(module: nn.Module) -> None:
    """Free a block: parameters and persistent buffers go back to the meta device (with their
    new shapes); buffers computed at construction stay, as no checkpoint holds them."""
    for m in module.modules():
        for name, p in list(m._parameters.items()):
            if p is not None:
                m._parameters[name] = nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device="meta"), requires_grad=False)
        for name, buf in list(m._buffers.items()):
            if buf is not None and name not in m._non_persistent_buffers_set:
                m._buffers[name] = torch.empty(buf.shape, dtype=buf.dtype, device="meta")


def release(root: nn.Module) -> None:
    """Send every loaded parameter of ``root`` back to the meta device, keeping ties: a parameter
    shared by several modules (tied embeddings) becomes one meta parameter shared by all of them."""
    metas: dict[int, nn.Parameter] = {}
    for m in root.modules():
        for name, p in list(m._parameters.items()):
            if p is not None and not p.is_meta:
                if id(p) not in metas:
                    metas[id(p)] = nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device="meta"), requires_grad=False)
                m._parameters[name] = metas[id(p)]


def materialise_own(module: nn.Module, name: str, ckpt: Checkpoint, device: torch.device, dtype: torch.dtype,
                     root: nn.Module | None = None) -> None:
    """Load one module's own parameters (not its children's); one missing from the checkpoint
    (a tied head) stays on the meta device. A parameter shared with other modules of ``root``
    (tied embeddings) gets the loaded value everywhere, so the tie holds."""
    owners: dict[int, list[tuple[nn.Module, str]]] = {}
    for m in (root or module).modules():
        for pname, p in m._parameters.items():
            if p is not None:
                owners.setdefault(id(p), []).append((m, pname))
    for pname, p in list(module.named_parameters(recurse=False)):
        key = f"{name}.{pname}" if name else pname
        if key not in ckpt.weight_map:
            continue
        t = ckpt.read([key])[key]
        new = nn.Parameter(t.to(device=device, dtype=dtype if t.is_floating_point() else None), requires_grad=False)
        for owner, attr in owners.get(id(p), [(module, pname)]):
            setattr(owner, attr, new)
