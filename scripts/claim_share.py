"""How much of a round one inflated MACs claim carries, and how often an honest claim is clipped.

Issue 20, item 3. DISTREAL weights each update by the MACs its client claims (Algorithm 2 of
Rapp et al., AAAI 2022). A client can claim anything; the server bounds the claim by the batches
it configured (``batch_size``: the node's ``round-samples`` or the reply's ``num-examples``), by
``claim_bound`` times the round's median claim, and by ``share_bound``: no reply weighs more than
``k`` times the mean of the others, so one reply holds at most ``k / (n + k - 1)`` of the round's
weight (:func:`flwr_distreal.server.bounds.cap_shares`).

Part 1, the attack. Honest replies come from the real resources model of the FEMNIST preset
(``+experiment=fig6_femnist resources.lam=2``: time-varying availability at lambda = 2, 105
writers, each device's plan of Algorithm 1 on the shipped LUT): claims, mini-batches and
examples. One more drawn device inflates its reply as in the issue: ``macs = 1e9 x`` the full
model's MACs per sample over ``num_batches = 1e9`` (its own ``num-examples`` kept, or inflated
too). Updates are synthetic (a drift shared by all clients plus noise, growing with the
batches); the attacker sends the opposite of the honest mean, either at an honest norm
(``flip``) or at the largest norm the update bound lets through (``max``, found by bisection).
Printed per setting and round size: the attacker's share of the weight (0 when refused) and the
global model's move against the honest mean, ``|w_new - w_honest| / |w_honest - w_old|`` with
``w_honest`` Algorithm 2 over the honest replies alone (mean and max over the rounds).

Part 2, honest rounds. Many rounds of honest replies from the real resources model (digits and
FEMNIST presets at lambda = 2) go through the same claim bounds; printed: how often an honest
claim would be clipped for share bounds k = 2, 3, 4, 5 (4 is the default) and the largest ratio of
an honest claim to the others' mean that was seen.

Run (about 2 minutes on 2 busy cores)::

    .venv/bin/python scripts/claim_share.py
    .venv/bin/python scripts/claim_share.py --rounds 20 --honest-rounds 100   # quicker
"""

from __future__ import annotations

import argparse
import logging
import math
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from flwr_distreal.core import contract as C  # noqa: E402
from flwr_distreal.server.aggregate import mac_weighted_update  # noqa: E402
from flwr_distreal.core.lut import LUT  # noqa: E402
from flwr_distreal.core.resources import ResourceModel, batch_sizes  # noqa: E402
from flwr_distreal.training.schedule import plan_distreal_round  # noqa: E402
from flwr_distreal.server import (
    SHARE_BOUND,
    Accepted,
    DistrealCore,
    Reply,
    RoundBounds,
)

INFLATED_BATCHES = 1e9
#: Share bounds whose honest false-clip rates are printed.
KS = (2.0, 3.0, 4.0, 5.0)


@dataclass(frozen=True)
class HonestReply:
    """What an honest device reports in one round (simulated clock, Algorithm 1)."""

    device: int
    macs: int
    batches: int
    examples: int


@dataclass
class Devices:
    """The devices of a run: their samples, ``r_max``, the resource model and the LUT."""

    sizes: list[int]
    r_max: list[float]
    resources: ResourceModel
    lut: LUT
    batch_size: int
    local_epochs: int
    policy: str
    stop_at_deadline: bool
    step_macs_factor: float
    full_macs: float

    def reply(self, device: int, server_round: int) -> HonestReply | None:
        """The device's honest reply in a round; None for a straggler or a device that trained nothing."""
        clock = self.resources.clock(device, server_round, self.r_max[device])
        sizes = batch_sizes(self.sizes[device], self.batch_size, self.local_epochs)
        plan = plan_distreal_round(
            clock, self.lut, sizes, self.policy, self.step_macs_factor, self.stop_at_deadline  # type: ignore[arg-type]
        )
        if plan.straggler or plan.macs <= 0:
            return None
        return HonestReply(device, plan.macs, len(plan.vectors), int(sum(plan.batch_sizes)))


def devices_of_preset(overrides: Sequence[str]) -> Devices:
    """The devices of a Hydra preset, as :class:`flwr_distreal.run.experiment.Experiment` builds them."""
    from flwr_distreal.run.experiment import Experiment
    from flwr_distreal.cli.tune import compose_run

    cfg, _ = compose_run(list(overrides))
    exp = Experiment(cfg)
    assert exp.resources is not None and exp.lut is not None
    return Devices(
        sizes=exp.data.partition_sizes(),
        r_max=list(exp.r_max),
        resources=exp.resources,
        lut=exp.lut,
        batch_size=cfg.batch_size,
        local_epochs=cfg.local_epochs,
        policy=cfg.strategy.policy,
        stop_at_deadline=cfg.strategy.stop_at_deadline,
        step_macs_factor=exp.factor,
        full_macs=float(exp.full_forward_macs),
    )


def honest_rounds(devices: Devices, n: int, rounds: int, seed: int = 0) -> list[list[HonestReply]]:
    """``rounds`` rounds of ``n`` devices drawn with ``random.Random(seed)`` (the servers'
    seeded draw over sorted device ids), each the replies of the devices that trained."""
    rng = random.Random(seed)
    out = []
    for t in range(1, rounds + 1):
        drawn = rng.sample(range(len(devices.sizes)), n)
        out.append([r for r in (devices.reply(d, t) for d in drawn) if r is not None])
    return out


# ------------------------------------------------------------------ honest false clips


def claim_weights(
    claims: Sequence[float], *, share_bound: float | None, claim_bound: float | None = 10.0
) -> list[float]:
    """The weights the server gives one round's claims (median bound, then share cap), through
    :meth:`RoundBounds.screen` with the update bounds off (claims only)."""
    bounds = RoundBounds(update_bound=None, claim_bound=claim_bound, share_bound=share_bound)
    candidates = [Accepted(Reply(str(i), i, [], 0.0, {}), float(c)) for i, c in enumerate(claims)]
    screened = bounds.screen([], candidates, [None] * len(candidates), claims=True)
    weights = {a.reply.node: float(a.macs or 0.0) for a in screened.accepted}
    return [weights[str(i)] for i in range(len(claims))]


def claim_clips(claims: Sequence[float], *, share_bound: float | None, claim_bound: float | None = 10.0) -> list[bool]:
    """Which claims of one round the server's claim bounds clip (:func:`claim_weights`)."""
    weights = claim_weights(claims, share_bound=share_bound, claim_bound=claim_bound)
    return [w != float(c) for w, c in zip(weights, claims)]


def max_ratio_to_others(claims: Sequence[float]) -> float:
    """The largest ``c_i / mean_{j != i} c_j`` of a round: the smallest ``share_bound`` that
    clips none of its claims."""
    c = np.asarray(claims, float)
    if len(c) < 2:
        return 0.0
    return float(np.max(c * (len(c) - 1) / (c.sum() - c)))


def false_clip_rates(
    rounds: list[list[HonestReply]], share_bounds: Sequence[float | None]
) -> dict[float | None, tuple[float, float, float]]:
    """Per share bound: the fraction of honest replies clipped, of rounds with a clip, and the
    mean weight an honest clipped reply lost."""
    out = {}
    for k in share_bounds:
        replies = clipped = rounds_hit = 0
        lost: list[float] = []
        for rnd in rounds:
            claims = [float(r.macs) for r in rnd]
            weights = claim_weights(claims, share_bound=k)
            flags = [w != c for w, c in zip(weights, claims)]
            replies += len(flags)
            clipped += sum(flags)
            rounds_hit += any(flags)
            lost += [1.0 - w / c for w, c, f in zip(weights, claims, flags) if f]
        out[k] = (clipped / max(replies, 1), rounds_hit / max(len(rounds), 1), float(np.mean(lost)) if lost else 0.0)
    return out


# ------------------------------------------------------------------------- the attack

SHAPES = [(16, 8, 3, 3), (10, 64), (10,)]


def _global(seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [(0.1 * rng.normal(size=s)).astype(np.float32) for s in SHAPES]


def _honest_arrays(g: list[np.ndarray], drift: list[np.ndarray], batches: int, seed: int) -> list[np.ndarray]:
    """``batches`` SGD-like steps: a drift shared by all clients plus noise."""
    rng = np.random.default_rng(seed)
    return [
        (a + 1e-3 * (batches * d + math.sqrt(batches) * rng.normal(size=a.shape))).astype(a.dtype)
        for a, d in zip(g, drift)
    ]


def _delta(a: list[np.ndarray], b: list[np.ndarray]) -> np.ndarray:
    return np.concatenate([(x.astype(np.float64) - y.astype(np.float64)).ravel() for x, y in zip(a, b)])


@dataclass(frozen=True)
class Setting:
    """A server setting and what the attacker inflates."""

    name: str
    batch_size: int | None
    share_bound: float | None
    inflate_examples: bool = False
    robust: str | None = None


SETTINGS = (
    Setting("before (no batch size, 10 x median only)", None, None),
    Setting("no batch size", None, SHARE_BOUND),
    Setting("batch size", 32, SHARE_BOUND),
    Setting("batch size, examples inflated too", 32, SHARE_BOUND, inflate_examples=True),
    Setting("no batch size, robust=clip-to-median", None, SHARE_BOUND, robust="clip-to-median"),
)


def attack_round(
    rnd: list[HonestReply], setting: Setting, full_macs: float, *, mode: str, seed: int
) -> tuple[float, float]:
    """One round with the last reply inflated: (the attacker's share of the weight, the model's
    move against the honest mean)."""
    honest, victim = rnd[:-1], rnd[-1]
    g = _global(seed)
    rng = np.random.default_rng([seed, 7])
    drift = [rng.normal(size=a.shape) for a in g]
    arrays = [_honest_arrays(g, drift, r.batches, seed * 1000 + r.device) for r in honest]
    w_honest = mac_weighted_update(g, arrays, [float(r.macs) for r in honest])
    mean_update = _delta(w_honest, g)

    def attacker(norm: float) -> list[np.ndarray]:
        direction = -mean_update / np.linalg.norm(mean_update)
        out, start = [], 0
        for a in g:
            part = direction[start : start + a.size].reshape(a.shape)
            out.append((a + norm * part).astype(a.dtype))
            start += a.size
        return out

    def run(norm: float) -> tuple[float, list[np.ndarray] | None, bool]:
        core = DistrealCore(
            full_macs_per_sample=full_macs,
            batch_size=setting.batch_size,
            bounds=RoundBounds(share_bound=setting.share_bound, robust=setting.robust),  # type: ignore[arg-type]
        )
        core.broadcast(1, g)
        replies = [
            Reply(str(r.device), r.device, a, float(r.examples), {C.MACS: float(r.macs), C.NUM_BATCHES: r.batches})
            for r, a in zip(honest, arrays)
        ]
        examples = INFLATED_BATCHES * 32 if setting.inflate_examples else float(victim.examples)
        metrics = {C.MACS: INFLATED_BATCHES * full_macs, C.NUM_BATCHES: INFLATED_BATCHES}
        replies.append(Reply("attacker", victim.device, attacker(norm), examples, metrics))
        outcome = core.aggregate(1, replies, logger=_QUIET)
        total = sum(float(a.macs or 0.0) for a in outcome.accepted)
        share = sum(float(a.macs or 0.0) for a in outcome.accepted if a.reply.node == "attacker") / total
        accepted = any(a.reply.node == "attacker" for a in outcome.accepted)
        return share, outcome.arrays, accepted

    own_norm = float(np.linalg.norm(_delta(_honest_arrays(g, drift, victim.batches, seed * 1000 + victim.device), g)))
    norm = own_norm
    if mode == "max":  # the largest norm the update bound accepts (when the reply is accepted at all)
        lo, hi = 0.0, own_norm
        while run(hi)[2] and hi < 1e6 * own_norm:
            lo, hi = hi, 2 * hi
        if run(lo)[2]:
            for _ in range(25):
                mid = 0.5 * (lo + hi)
                lo, hi = (mid, hi) if run(mid)[2] else (lo, mid)
        norm = lo if lo > 0 else own_norm
    share, new, _ = run(norm)
    move = float(np.linalg.norm(_delta(new, w_honest)) / np.linalg.norm(mean_update)) if new is not None else 1.0
    return share, move


_QUIET = logging.getLogger("claim_share.quiet")
_QUIET.addHandler(logging.NullHandler())
_QUIET.propagate = False


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=20, help="attack rounds per round size (default 20)")
    parser.add_argument(
        "--honest-rounds", type=int, default=500, help="honest rounds per preset and size (default 500)"
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)
    start = time.perf_counter()

    femnist = devices_of_preset(["+experiment=fig6_femnist", "resources.lam=2"])
    print("# one inflated claim (macs = 1e9 x full MACs per sample over 1e9 batches) among honest replies")
    print("# honest replies: fig6_femnist preset, time-varying resources lambda = 2, 105 writers, learned LUT;")
    print(f"# {args.rounds} rounds per size; share = attacker's weight / round's weight; move = "
          "|w_new - w_honest| / |w_honest - w_old| (mean / max over the rounds)")
    print(f"{'setting':42s} {'honest':>6s} {'limit':>6s} {'share mean':>10s} {'share max':>9s} "
          f"{'move flip':>15s} {'move max-norm':>15s}")
    for n_honest in (4, 9, 34):
        rounds = [r for r in honest_rounds(femnist, n_honest + 1, args.rounds, args.seed) if len(r) == n_honest + 1]
        for setting in SETTINGS:
            shares, flips, maxes = [], [], []
            for i, rnd in enumerate(rounds):
                share, flip = attack_round(rnd, setting, femnist.full_macs, mode="flip", seed=args.seed + i)
                _, worst = attack_round(rnd, setting, femnist.full_macs, mode="max", seed=args.seed + i)
                shares.append(share)
                flips.append(flip)
                maxes.append(worst)
            k = setting.share_bound
            limit = f"{k / (n_honest + k):.1%}" if k is not None else "-"
            print(
                f"{setting.name:42s} {n_honest:6d} {limit:>6s} {np.mean(shares):10.1%} {np.max(shares):9.1%} "
                f"{np.mean(flips):7.2f} / {np.max(flips):5.2f} {np.mean(maxes):7.2f} / {np.max(maxes):5.2f}"
            )

    print()
    print("# honest rounds (no attacker): how often the claim bounds clip an honest claim")
    print(f"# {args.honest_rounds} rounds per preset and size; claim_bound 10 x median, share bound k "
          f"(default {SHARE_BOUND:g}); 'lost' = mean weight a clipped honest reply lost")
    print(f"{'preset':36s} {'n':>3s} {'max ratio':>9s} " + " ".join(f"{'k=' + format(k, 'g'):>24s}" for k in KS))
    digits = devices_of_preset(["+experiment=main_digits"])
    for name, devices, sizes in (
        ("main_digits (20 devices, lambda 2)", digits, (5, 10)),
        ("fig6_femnist (105 writers, lambda 2)", femnist, (5, 35)),
    ):
        for n in sizes:
            rounds = honest_rounds(devices, n, args.honest_rounds, args.seed + 1)
            ratio = max(max_ratio_to_others([r.macs for r in rnd]) for rnd in rounds)
            rates = false_clip_rates(rounds, KS)
            cells = " ".join(
                f"{rates[k][0]:7.2%} rep {rates[k][1]:6.1%} rnd" + (f" -{rates[k][2]:.0%}" if rates[k][0] else "    ")
                for k in KS
            )
            print(f"{name:36s} {n:3d} {ratio:9.2f} {cells}")
    print(f"# {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
