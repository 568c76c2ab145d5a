"""Grow a trained OSRT checkpoint to more slots: a run's next phase with spare slots.

    python -m benchmarks.learning.grow_slots CHECKPOINT --slots K --out PATH [--noise 0.3] [--seed 0]

OSRT's slots start from learned initial slots (`encoder.slot_attention.initial_slots`, [K, D]);
nothing else in the model depends on K. The new checkpoint keeps every trained weight and the
optimiser's state; each new initial slot is a copy of an old one (old slots taken in turn) plus
Gaussian noise of `--noise` times the old slots' spread per feature, so the copies start near a
learned slot and slot attention's competition tells them apart. Their Adam moments are their
sources'. The step count, schedule and RNG state are kept: continue it with the config's
`model.encoder_kwargs.num_slots` set to K (bench_learning --resume-from PATH --set
model.encoder_kwargs.num_slots=K).

Why: on the full family, the errors left at step 40,000 are merged objects in scenes of 5 and 6
objects (the ground takes one or two of the 7 slots). Grown at step 40,000 and cooled down, the
10 slots did not separate more objects within 8000 steps; trained with K = 10 from the start
(full_slots_10_long), they did, and configs/full.yaml has 10 since.
"""
from __future__ import annotations

import argparse
import copy

import torch

KEY = "slot_attention.initial_slots"        # in the encoder's state


def parse(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.learning.grow_slots",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", help="a checkpoint written by train.py")
    p.add_argument("--slots", type=int, required=True, help="the new number of slots K (more than now)")
    p.add_argument("--out", required=True, help="where to write the grown checkpoint")
    p.add_argument("--noise", type=float, default=0.3,
                   help="noise on each copied slot, in units of the old slots' spread per feature")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def grown_rows(old: torch.Tensor, slots: int, noise: float, generator: torch.Generator):
    """(new initial slots [slots, D], the source row of each new row)."""
    k = old.shape[0]
    sources = [i % k for i in range(slots - k)]
    spread = old.float().std(0, keepdim=True) if k > 1 else old.float().abs().mean().expand(1, old.shape[1])
    extra = old[sources].float() + noise * spread * torch.randn(len(sources), old.shape[1], generator=generator)
    return torch.cat([old, extra.to(old.dtype)]), sources


def grow(checkpoint: str, slots: int, out: str, noise: float = 0.3, seed: int = 0) -> None:
    from osrt_fast import OSRT
    from osrt_fast.checkpoint import read_checkpoint, save_checkpoint
    state = read_checkpoint(checkpoint)
    extras = dict(state.get("osrt_fast") or {})
    model_config = copy.deepcopy(extras.get("model_config"))
    if not model_config:
        raise SystemExit(f"{checkpoint} records no model config (a reference checkpoint?): "
                         f"train it here once (train.py resumes it) and grow that")
    old = state["encoder"][KEY]
    if slots <= old.shape[0]:
        raise SystemExit(f"--slots {slots}: the checkpoint has {old.shape[0]} slots already; "
                         f"give more")
    model_config["encoder_kwargs"]["num_slots"] = slots
    model = OSRT(model_config)
    generator = torch.Generator().manual_seed(seed)
    rows, sources = grown_rows(old, slots, noise, generator)
    encoder = dict(state["encoder"], **{KEY: rows})
    model.encoder.load_state_dict(encoder)
    model.decoder.load_state_dict(state["decoder"])

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=0.0)
    optim_sd = state.get("optimizer")
    if optim_sd:
        names = [n for n, p in model.named_parameters() if p.requires_grad]
        index = names.index("encoder." + KEY)
        optim_sd = copy.deepcopy(optim_sd)
        moments = optim_sd["state"].get(index)
        if moments:
            for name in ("exp_avg", "exp_avg_sq"):
                moments[name] = torch.cat([moments[name], moments[name][sources]])
        optimizer.load_state_dict(optim_sd)
    scalars = {k: state[k] for k in ("it", "epoch_it", "t", "loss_val_best", "run_id") if k in state}
    keep = {k: v for k, v in extras.items()
            if k not in ("version", "package_version", "model_config", "weights_sha256")}
    save_checkpoint(out, model, optimizer, extras=keep, **scalars)
    print(f"Wrote {out}: {old.shape[0]} -> {slots} slots (new ones copied from slots {sources}, "
          f"noise {noise}), step {state.get('it')}.")


def main(argv=None) -> None:
    args = parse(argv)
    grow(args.checkpoint, args.slots, args.out, args.noise, args.seed)


if __name__ == "__main__":
    main()
