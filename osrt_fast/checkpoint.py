"""Checkpoints: the reference's format plus our extras, written atomically, read without pickle code.

A checkpoint is the reference's dict -- {'encoder': state_dict, 'decoder': state_dict,
'optimizer': state_dict, 'it', 'epoch_it', 't', 'loss_val_best', 'run_id'} -- plus one key,
'osrt_fast', holding the format version, the model config, and the scheduler and RNG state for
exact resume. The reference reads ours; we read both, always with `weights_only=True`.
"""
from __future__ import annotations

import os
import pickle
import tempfile
from typing import Optional

import torch
import torch.nn as nn

from .errors import UserError
from .files import TMP_PREFIX, explain_write_error, file_mode

FORMAT_VERSION = 1


class CheckpointError(UserError, RuntimeError):
    """A checkpoint cannot be written or does not fit the model; the message says why."""


class DamagedCheckpoint(CheckpointError):
    """A checkpoint file is damaged (empty, cut short, unreadable, its weights changed since they
    were written, or not finite): another checkpoint of the run may still be good."""


def weights_digest(state: dict) -> str:
    """SHA-256 of the encoder's and decoder's tensors (names, dtypes, shapes and bytes, in name
    order), as written: load_checkpoint recomputes it, so a changed byte is found."""
    import hashlib
    h = hashlib.sha256()
    for part in ("encoder", "decoder"):
        for name in sorted(state[part]):
            v = state[part][name]
            if not isinstance(v, torch.Tensor):
                continue
            t = v.detach().cpu().contiguous()
            h.update(f"{part}.{name}:{t.dtype}:{tuple(t.shape)};".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def unwrap(module: nn.Module) -> nn.Module:
    """The plain module inside DDP / FSDP-style (`.module`) and torch.compile (`._orig_mod`) wrappers."""
    while True:
        if hasattr(module, "_orig_mod"):
            module = module._orig_mod
        elif isinstance(module, nn.parallel.DistributedDataParallel):
            module = module.module
        else:
            return module


def _all_finite(obj) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in _tensors(obj) if t.is_floating_point())


def save_checkpoint(path: str, model: nn.Module, optimizer: Optional[torch.optim.Optimizer] = None,
                    extras: Optional[dict] = None, **scalars) -> None:
    """Writes `path` atomically: a temporary file in the same folder, fsync'd, read back and
    checked, then renamed over the old file. A model with non-finite parameters is refused, so
    a good checkpoint is never replaced by a broken one.

    scalars: the reference's 'it' (completed steps), 'epoch_it', 't' (training seconds),
        'loss_val_best', 'run_id'.
    extras: merged into state['osrt_fast'] = {'version', 'package_version', 'model_config', ...};
        the trainer adds 'lr_scheduler' (its parameters), 'rng' (capture_rng_state()) and
        'seed'. Plain types and tensors only, so the file loads with weights_only=True.
    """
    from . import parallel
    model = unwrap(model)
    rank = parallel.current().rank
    if parallel.is_sharded(model):
        # FSDP: gather the whole state to rank 0 (every rank takes part), in the single-process
        # format, so any number of processes can resume from it.
        full, optim_sd = parallel.gather_full_state(model, optimizer)
        if rank != 0:
            return _outcome_from_rank0(path, model)
        state = {part: {k[len(part) + 1:]: v for k, v in full.items() if k.startswith(part + ".")}
                 for part in ("encoder", "decoder")}
    else:
        if rank != 0:                # DDP: every rank holds the same state; rank 0 writes it
            return _outcome_from_rank0(path, model)
        # The reference wraps encoder and decoder in DDP separately; save the modules' own keys.
        state = {part: unwrap(getattr(model, part)).state_dict() for part in ("encoder", "decoder")}
        optim_sd = optimizer.state_dict() if optimizer is not None else None
    try:
        _write(path, model, state, optim_sd, extras, scalars)
    except BaseException:
        _announce_outcome(model, ok=False)
        raise
    _announce_outcome(model, ok=True)


def _flag(model, value: float) -> torch.Tensor:
    device = next(model.parameters()).device
    return torch.tensor([value], device=device if device.type == "cuda" else "cpu")


def _announce_outcome(model, ok: bool) -> None:
    from . import parallel
    if parallel.current().distributed:
        import torch.distributed as dist
        dist.broadcast(_flag(model, 1.0 if ok else 0.0), src=0)


def _outcome_from_rank0(path: str, model) -> None:
    """Other ranks learn whether rank 0 wrote the checkpoint, so all fail (or go on) together."""
    import torch.distributed as dist
    flag = _flag(model, 0.0)
    dist.broadcast(flag, src=0)
    if flag.item() != 1.0:
        raise CheckpointError(f"rank 0 could not write {path} (see its error); the existing file, "
                              "if any, is kept")


def _write(path: str, model, state: dict, optim_sd, extras, scalars) -> None:
    bad = _non_finite(state)
    if bad:
        raise CheckpointError(f"refusing to write {path}: the model has non-finite parameters "
                              f"({', '.join(bad[:4])}{' ...' if len(bad) > 4 else ''}); the "
                              "existing file, if any, is kept")
    if optim_sd is not None:
        state["optimizer"] = optim_sd
    state.update(scalars)
    cfg = getattr(model, "cfg", None)
    from .version import __version__
    state["osrt_fast"] = {"version": FORMAT_VERSION, "package_version": __version__,
                          "model_config": _config_dict(cfg) if cfg is not None else None,
                          "weights_sha256": weights_digest(state), **(extras or {})}
    try:
        _write_verified(path, state)
    except (OSError, RuntimeError) as e:
        if isinstance(e, CheckpointError):
            raise
        needed = sum(v.numel() * v.element_size() for v in _tensors(state))
        reason = explain_write_error(e, path, needed)
        if reason is None:
            raise
        raise CheckpointError(reason) from None


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v)


def _write_verified(path: str, state: dict) -> None:
    """torch.save to a temporary file in the same folder, fsync, read back, rename over `path`."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX, suffix=".pt", dir=folder)
    try:
        os.fchmod(fd, file_mode())            # as readable as any other file (mkstemp: 0600)
        with os.fdopen(fd, "wb") as f:
            try:
                torch.save(state, f)
                f.flush()
            except RuntimeError:
                _raise_os_error(f)     # torch reports a full disk without its errno
                raise
            os.fsync(f.fileno())
        # Read back exactly as a later resume will (weights_only), so a file that cannot be
        # resumed from never replaces one that can.
        try:
            check = torch.load(tmp, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            raise CheckpointError(f"checkpoint for {path} holds a value that weights_only loading "
                                  f"rejects (only tensors and plain values may be saved): {e}") from None
        intact = (all(set(check[p]) == set(state[p]) for p in ("encoder", "decoder"))
                  and weights_digest(check) == state["osrt_fast"]["weights_sha256"])
        if not intact or not _all_finite(check):
            raise CheckpointError(f"the checkpoint written for {path} did not read back intact "
                                  "(missing keys or non-finite tensors); the old file is kept")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _raise_os_error(f) -> None:
    """Writes a little more to `f`: a full disk or exceeded quota then raises its OSError."""
    f.write(bytes(1 << 16))
    f.flush()
    os.fsync(f.fileno())


def capture_rng_state() -> dict:
    """torch's CPU RNG state and, where CUDA is initialised, every device's ({'torch', 'cuda'})."""
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: Optional[dict]) -> None:
    """Inverse of capture_rng_state; CUDA states are restored only when the device count matches."""
    if not state:
        return
    if state.get("torch") is not None:
        torch.set_rng_state(state["torch"].cpu())
    cuda = state.get("cuda")
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([s.cpu() for s in cuda])


def _config_dict(cfg) -> dict:
    import dataclasses
    return dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else dict(cfg)


ZIP_MAGIC = b"PK\x03\x04"
LEGACY_MAGIC = b"\x80\x02\x8a\n"          # torch's pre-1.6 files: a pickled magic number first


def _container(path: str) -> str:
    """'zip' (torch.save since 1.6), 'legacy' (older torch.save), 'pickle', 'empty' or 'unknown'."""
    with open(path, "rb") as f:
        head = f.read(4)
    if not head:
        return "empty"
    if head == ZIP_MAGIC:
        return "zip"
    if head == LEGACY_MAGIC:
        return "legacy"
    return "pickle" if head[:1] == b"\x80" else "unknown"


def read_checkpoint(path: str, map_location="cpu") -> dict:
    """Loads a checkpoint file with `weights_only=True`; refuses files that need to run code,
    and says plainly when a file is empty, cut short or not a checkpoint at all."""
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint file '{path}' does not exist")
    kind = _container(path)
    damaged = ("Use another checkpoint of the run (model_best.pt, a model_<it>.pt backup) or "
               "the original file")
    if kind == "empty":
        raise DamagedCheckpoint(f"'{path}' is empty (0 bytes), not a checkpoint. {damaged}.")
    if kind == "unknown":
        raise DamagedCheckpoint(f"'{path}' is not a PyTorch checkpoint (it is neither a zip archive "
                              f"nor a pickle): the file is damaged or of another kind. {damaged}.")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"refusing to load '{path}': this file needs arbitrary Python code to load (only "
            f"tensors and plain values are allowed). If you trust it, re-save its tensors with:\n"
            f"  python -c \"import torch; s = torch.load('{path}', weights_only=False); "
            f"torch.save({{k: s[k] for k in ('encoder', 'decoder', 'optimizer', 'it') if k in s}}, "
            f"'{path}.safe.pt')\"\n"
            f"and load '{path}.safe.pt'. Details: {str(e).splitlines()[0]}") from None
    except (RuntimeError, EOFError, OSError, KeyError, ValueError) as e:
        raise DamagedCheckpoint(f"'{path}' is damaged: it could not be read as a PyTorch checkpoint "
                              f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'cut short'}). "
                              f"{damaged}.") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"'{path}' holds a {type(state).__name__}, not a checkpoint dict")
    return state


def _whole(v, low=0) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= low


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


# Entries a checkpoint may carry besides the weights: key -> (check, what is expected).
_FIELDS = {
    "it": (_whole, "a whole number >= 0 (completed training steps)"),
    "epoch_it": (_whole, "a whole number >= 0"),
    "t": (_number, "a number (training seconds)"),
    "loss_val_best": (_number, "a number (the best validation metric)"),
    "run_id": (lambda v: v is None or isinstance(v, str), "a string or None"),
}
_EXTRAS = {
    "version": (_whole, "the format version, a whole number"),
    "model_config": (lambda v: v is None or isinstance(v, dict), "a mapping or None"),
    "lr_scheduler": (lambda v: isinstance(v, dict), "a mapping"),
    "seed": (lambda v: isinstance(v, int) and not isinstance(v, bool), "a whole number"),
    "world_size": (lambda v: _whole(v, 1), "a whole number >= 1"),
    "weights_sha256": (lambda v: isinstance(v, str) and len(v) == 64, "a SHA-256 hex digest"),
    "rng": (lambda v: isinstance(v, dict) and isinstance(v.get("torch"), torch.Tensor)
            and v["torch"].dtype == torch.uint8
            and all(isinstance(x, torch.Tensor) for x in v.get("cuda") or []),
            "{'torch': a uint8 tensor, 'cuda': [uint8 tensors]} (capture_rng_state)"),
}


def check_entries(state: dict, path: str) -> None:
    """CheckpointError naming the first entry (besides the weights) of the wrong type or range."""
    extras = state.get("osrt_fast")
    if extras is not None and not isinstance(extras, dict):
        raise CheckpointError(f"'{path}' is damaged: its 'osrt_fast' entry is a "
                              f"{type(extras).__name__}, expected a mapping")
    for where, entries, table in (("", state, _FIELDS), ("osrt_fast.", extras or {}, _EXTRAS)):
        for key, (ok, expected) in table.items():
            if key in entries and not ok(entries[key]):
                value = repr(entries[key])
                raise DamagedCheckpoint(
                    f"'{path}' is damaged: '{where}{key}' is {value[:60]}{'...' if len(value) > 60 else ''}, "
                    f"expected {expected}. Use another checkpoint of the run (model_best.pt, a "
                    f"model_<it>.pt backup)")


def _non_finite(state: dict) -> list:
    return [f"{part}.{k}" for part in ("encoder", "decoder") for k, v in state[part].items()
            if isinstance(v, torch.Tensor) and v.is_floating_point() and not bool(torch.isfinite(v).all())]


def checkpoint_format(state: dict) -> str:
    """'osrt_fast', 'reference', or 'flat' (one state dict with 'encoder.' / 'decoder.' keys)."""
    if "osrt_fast" in state:
        return "osrt_fast"
    if isinstance(state.get("encoder"), dict) and isinstance(state.get("decoder"), dict):
        return "reference"
    if any(isinstance(k, str) and k.startswith(("encoder.", "decoder.")) for k in state):
        return "flat"
    raise CheckpointError("not an OSRT checkpoint: expected 'encoder' and 'decoder' state dicts; "
                          f"found keys {sorted(map(str, state))[:8]}")


def _mismatch_report(part: str, expected: dict, found: dict) -> list:
    lines = []
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    if missing:
        lines.append(f"{part}: missing keys {missing[:6]}{' ...' if len(missing) > 6 else ''} "
                     f"({len(missing)} in all)")
    if unexpected:
        lines.append(f"{part}: unexpected keys {unexpected[:6]}"
                     f"{' ...' if len(unexpected) > 6 else ''} ({len(unexpected)} in all)")
    for k in sorted(set(expected) & set(found)):
        if tuple(expected[k].shape) != tuple(found[k].shape):
            lines.append(f"{part}.{k}: checkpoint {tuple(found[k].shape)} vs model "
                         f"{tuple(expected[k].shape)}")
    return lines


def _flat(d, prefix: str = "") -> dict:
    out = {}
    for k, v in (d or {}).items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


# Model config keys that choose how the model is computed, not its parameters' shapes.
_NOT_SHAPE = ("backend", "encoder_attention")


def config_difference(written: dict, current) -> list:
    """'key: checkpoint X, config Y' for each model config entry (flattened, `*_kwargs` inside)
    where the checkpoint's config and `current` (a ModelConfig) differ."""
    now = _flat(_config_dict(current))
    then = _flat(written)
    keys = [k for k in sorted(set(now) | set(then))
            if now.get(k) != then.get(k) and k.split(".")[-1] not in _NOT_SHAPE]
    return [f"{k}: checkpoint {then.get(k, '(default)')!r}, config {now.get(k, '(default)')!r}"
            for k in keys]


def _hint(state: dict, current=None) -> str:
    enc, dec = state.get("encoder", {}), state.get("decoder", {})
    hints = []
    slots = enc.get("slot_attention.initial_slots")
    if slots is not None:
        hints.append(f"encoder: osrt with num_slots: {slots.shape[0]}, slot_dim: {slots.shape[1]}")
    elif "conv_blocks.0.layers.0.weight" in enc:
        hints.append("encoder: srt")
    if "mixing_block.to_q.weight" in dec:
        hints.append("decoder: slot_mixer")
    elif "render_mlp.0.weight" in dec:
        hints.append("decoder: spatial_broadcast")
    elif "render_mlp.net.0.weight" in dec:
        hints.append("decoder: srt")
    cfg = state.get("osrt_fast", {}).get("model_config") if isinstance(state.get("osrt_fast"), dict) else None
    if cfg and current is not None:
        diff = config_difference(cfg, current)
        if diff:
            return ("The checkpoint was written for another model config; where it differs from "
                    "this one:\n  " + "\n  ".join(diff[:8])
                    + (f"\n  ... {len(diff) - 8} more" if len(diff) > 8 else "")
                    + "\nUse the config it was trained with (its run folder's config.yaml).")
    if cfg:
        return f" The checkpoint was written for model config {cfg}."
    return f" The checkpoint looks like: {'; '.join(hints)}." if hints else ""


def load_checkpoint(path: str, model: nn.Module, optimizer: Optional[torch.optim.Optimizer] = None,
                    map_location="cpu", strict: bool = True) -> dict:
    """Loads a checkpoint (ours or the reference's) into `model` (and `optimizer` if given).

    Returns the remaining entries ('it', 'epoch_it', 't', 'loss_val_best', 'run_id', and our
    'osrt_fast' extras where present). A checkpoint of another model or shape raises
    CheckpointError naming the mismatched keys and shapes.
    """
    state = read_checkpoint(path, map_location)
    fmt = checkpoint_format(state)
    if fmt == "flat":
        state = {"encoder": {k[8:]: v for k, v in state.items() if k.startswith("encoder.")},
                 "decoder": {k[8:]: v for k, v in state.items() if k.startswith("decoder.")}}
    check_entries(state, path)
    bad = _non_finite(state)
    if bad:
        raise DamagedCheckpoint(
            f"'{path}' has non-finite (NaN or infinite) weights ({', '.join(bad[:4])}"
            f"{' ...' if len(bad) > 4 else ''}, {len(bad)} tensors): it would render and evaluate "
            f"as NaN. Use an earlier checkpoint of the run (model_best.pt, a model_<it>.pt backup)")
    written = (state.get("osrt_fast") or {}).get("weights_sha256")
    if written is not None and weights_digest(state) != written:
        raise DamagedCheckpoint(f"'{path}' is damaged: its weights differ from what was written "
                                f"(their SHA-256 does not match the one saved with them). Use "
                                f"another checkpoint of the run (model_best.pt, a model_<it>.pt "
                                f"backup)")
    model = unwrap(model)
    modules = {part: unwrap(getattr(model, part)) for part in ("encoder", "decoder")}
    problems = []
    for part, module in modules.items():
        problems += _mismatch_report(part, module.state_dict(), state[part])
    if problems and strict:
        shown = problems[:4] + ([f"... {len(problems) - 4} more"] if len(problems) > 4 else [])
        raise CheckpointError(f"checkpoint '{path}' does not fit this model:\n  "
                              + "\n  ".join(shown) + "\n"
                              + _hint(state, getattr(model, "cfg", None)).strip())
    if problems:
        print(f"warning: loading '{path}' non-strictly; skipped:\n  " + "\n  ".join(problems))
    fitting = {}
    for part, module in modules.items():
        own = module.state_dict()
        # load_state_dict rejects shape mismatches even when not strict: leave those at init.
        fitting[part] = {k: v for k, v in state[part].items()
                         if k not in own or tuple(own[k].shape) == tuple(v.shape)}
    optim_sd = state.get("optimizer") if optimizer is not None else None
    if optimizer is not None and optim_sd is None:
        print(f"warning: '{path}' has no optimizer state; the optimizer starts fresh")
    from . import parallel
    try:
        if parallel.is_sharded(model):
            # FSDP: every rank read the whole file; each keeps its own shards.
            flat = {f"{part}.{k}": v for part in fitting for k, v in fitting[part].items()}
            parallel.load_full_state(model, flat, optimizer, optim_sd, strict=strict)
        else:
            for part, module in modules.items():
                module.load_state_dict(fitting[part], strict=strict)
            if optim_sd is not None:
                optimizer.load_state_dict(optim_sd)
    except (ValueError, KeyError) as e:
        raise CheckpointError(f"the optimizer state in '{path}' does not fit: {e}") from None
    return {k: v for k, v in state.items() if k not in ("encoder", "decoder", "optimizer")}


def load_trained_model(config_path: str, checkpoint: Optional[str] = None, device=None,
                       run_dir: Optional[str] = None):
    """(cfg, model in eval mode on `device`, checkpoint path, checkpoint entries) of a run:
    the config's model with `checkpoint` (default <run dir>/model.pt) loaded; `device` defaults
    to the config's training.device. ConfigError or CheckpointError naming the problem and the
    fix."""
    from .config import load_config, similar_file
    from .model import model_of_config_file
    from .parallel import resolve_device
    from .runs import run_dir_for
    cfg = load_config(config_path)
    path = checkpoint or os.path.join(run_dir_for(config_path, run_dir), "model.pt")
    if checkpoint and not os.path.isfile(checkpoint):
        raise CheckpointError(f"checkpoint file '{checkpoint}' (--checkpoint) does not exist"
                              f"{similar_file(checkpoint)}")
    if not os.path.isfile(path):
        raise CheckpointError(f"no checkpoint at {path}: train first (python train.py "
                              f"{config_path}) or pass --checkpoint PATH")
    device = torch.device(device) if device else resolve_device(cfg.training.device)
    model = model_of_config_file(cfg.model, config_path).to(device)
    model.check_device(device)
    state = load_checkpoint(path, model, map_location=device)
    return cfg, model.eval(), path, state
