"""Engine overhead of CycleGANTrainer: one CPU-preset training iteration through the MONAI/Ignite engine vs
the same iteration written as a bare PyTorch loop (same networks, same batch, same losses).

CPU preset (configs/train.yaml): batch 4 of 32x32x16 patches, generators with 8 channels / 2 residual blocks /
3^3 stem / no norm, mask-conditioned critics with 8 channels / 2 layers, n_critic 5. Paper preset
(configs/paper.yaml: image-only critics) with
--preset paper (a GPU run). Both variants run on identical pre-built batches (no data loading),
interleaved in rounds so machine load affects both alike; median and minimum per-iteration times and the
process CPU time per iteration are reported (on a shared machine the minimum and CPU time are the stable ones).

    OMP_NUM_THREADS=2 python benchmarks/bench_synthesis_engine.py [--iters 10] [--rounds 3] [--preset cpu|paper]
        [--device cuda] [--amp]

Results go to docs/performance.md by hand ("Synthesis training iteration").
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from ignite.engine import Events

from cmb_synthesis.synthesis.engine import CycleGANTrainer, loss_output
from cmb_synthesis.synthesis.losses import CriticObjective, GeneratorObjective, paper_terms
from cmb_synthesis.synthesis.networks import CMBCritic, CMBGenerator

PRESETS = {
    "cpu": dict(patch=(32, 32, 16), batch=4, g=(8, 2, 3), d=(8, 2), n_critic=5, norm=None, critic_mask=True),
    "paper": dict(patch=(160, 146, 32), batch=4, g=(32, 6, 7), d=(64, 3), n_critic=5, norm="instance", critic_mask=False),
}


def make(preset: dict, device: torch.device, seed: int = 0):
    torch.manual_seed(seed)
    c, r, k = preset["g"]
    nets = [CMBGenerator(channels=c, n_res_blocks=r, stem_kernel=k, norm=preset["norm"]).to(device) for _ in range(2)]
    cin = 2 if preset["critic_mask"] else 1
    nets += [CMBCritic(in_channels=cin, channels=preset["d"][0], num_layers_d=preset["d"][1]).to(device) for _ in range(2)]
    go = torch.optim.Adam(list(nets[0].parameters()) + list(nets[1].parameters()), 1e-4, betas=(0.5, 0.99))
    do = torch.optim.Adam(list(nets[2].parameters()) + list(nets[3].parameters()), 1e-4, betas=(0.5, 0.99))
    return nets, go, do


def objectives(preset: dict, nets: list) -> tuple[CriticObjective, CriticObjective, GeneratorObjective]:
    """The configs' objectives: both critics' WGAN-GP and the generators' default terms (configs/train.yaml)."""
    g1, g2, d1, d2 = nets
    cm = preset["critic_mask"]
    gen = GeneratorObjective(g1, g2, d1, d2, paper_terms(critic_mask=cm))
    return CriticObjective(d1, critic_mask=cm), CriticObjective(d2, critic_mask=cm), gen


def batch(preset: dict, device: torch.device) -> dict:
    b, s = preset["batch"], preset["patch"]
    y = torch.zeros(b, 1, *s)
    cx, cy, cz = (v // 2 for v in s)
    y[:, :, cx - 1 : cx + 2, cy - 1 : cy + 2, cz - 1 : cz + 2] = 1
    x = 0.5 + 0.1 * torch.rand(b, 1, *s)
    xp = x.clone()
    xp[y > 0] = 0.1
    return {k: v.to(device) for k, v in dict(
        x_h=x, y_hp=y, brainmask_h=torch.ones_like(x), x_p=xp, y_p=y, brainmask_p=torch.ones_like(x), x_p2=xp.flip(2), y_p2=y.flip(2)
    ).items()}  # fmt: skip


def bare_loop(preset, device, data, iters, amp):
    nets, go, do = make(preset, device)
    g1, g2, d1, d2 = nets
    cp, ch, gen = objectives(preset, nets)
    ac = lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp)  # noqa: E731
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        b = data
        with torch.no_grad(), ac():
            fp, fh = g1(b["x_h"], b["y_hp"]).float(), g2(b["x_p"], b["y_p"]).float()
        for _ in range(preset["n_critic"]):
            do.zero_grad(set_to_none=True)
            with ac():
                op, oh = cp(b["x_p2"], fp, b["y_p2"], b["y_hp"]), ch(b["x_h"], fh, b["y_hp"], b["y_p"])
            (op["loss"].float() + oh["loss"].float()).backward()
            do.step()
        for p in list(d1.parameters()) + list(d2.parameters()):
            p.requires_grad_(False)
        go.zero_grad(set_to_none=True)
        with ac():
            g = gen(b["x_h"], b["y_hp"], b["x_p"], b["y_p"], b["brainmask_h"], b["brainmask_p"])
        g["G"].float().backward()
        go.step()
        for p in list(d1.parameters()) + list(d2.parameters()):
            p.requires_grad_(True)
        _ = loss_output(g, op, oh)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return times


def engine_loop(preset, device, data, iters, amp):
    nets, go, do = make(preset, device)
    tr = CycleGANTrainer(device, 1, [data] * iters, *nets, go, do, *objectives(preset, nets), n_critic=preset["n_critic"],
                         amp=amp)  # fmt: skip
    times, t0 = [], [0.0]
    tr.add_event_handler(Events.ITERATION_STARTED, lambda e: t0.__setitem__(0, time.perf_counter()))

    def stop(e):
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0[0])

    tr.add_event_handler(Events.ITERATION_COMPLETED, stop)
    tr.run()
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="cpu", choices=sorted(PRESETS))
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--amp", action="store_true", help="bf16 autocast (gradient penalty in fp32)")
    args = ap.parse_args()
    device, preset = torch.device(args.device), PRESETS[args.preset]
    data = batch(preset, device)
    bare_loop(preset, device, data, 2, args.amp), engine_loop(preset, device, data, 2, args.amp)  # warm-up
    bare, eng, cpu_b, cpu_e = [], [], 0.0, 0.0
    for _ in range(args.rounds):
        t = time.process_time()
        bare += bare_loop(preset, device, data, args.iters, args.amp)
        cpu_b += time.process_time() - t
        t = time.process_time()
        eng += engine_loop(preset, device, data, args.iters, args.amp)
        cpu_e += time.process_time() - t
    mb, me = statistics.median(bare), statistics.median(eng)
    cb, ce = cpu_b / len(bare), cpu_e / len(eng)
    print(f"preset={args.preset} device={device} amp={args.amp} threads={torch.get_num_threads()} "
          f"iterations={len(bare)} per variant")
    print(f"bare PyTorch loop : median {mb * 1000:.1f} ms/iteration (min {min(bare) * 1000:.1f})")
    print(f"CycleGANTrainer   : median {me * 1000:.1f} ms/iteration (min {min(eng) * 1000:.1f})")
    print(f"CPU time/iteration: bare {cb * 1000:.1f} ms, engine {ce * 1000:.1f} ms")
    print(
        f"engine overhead   : {100 * (me - mb) / mb:+.2f} % (median), {100 * (min(eng) - min(bare)) / min(bare):+.2f} % (min), "
        f"{100 * (ce - cb) / cb:+.2f} % (CPU time)"
    )
    if device.type == "cuda":
        print(f"peak GPU memory   : {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")


if __name__ == "__main__":
    main()
