"""Expert parallelism on 8 CPU devices: what each device computes and what crosses devices in one MoE block's
forward and backward, by XLA's cost analysis of the compiled programs and the collectives in their HLO.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m benchmarks.moe_dispatch [--quick]

The block: a router (D x E) and E routed experts (gated MLP, width F) with LoRA r=8 on every expert kernel (one
adapter per expert), top-2 renormalised routing, T tokens; the program is the gradient of a scalar of the
block's output with respect to the adapters and the tokens (forward + backward). Variants:

- ``1 device, grouped``: the single-device path (``moe.experts_glu``, ``ragged_dot``). XLA:CPU lowers
  ``ragged_dot`` to a product masked per expert, so its cost analysis counts E times the grouped work;
- ``1 device, capacity``: the dispatch algorithm on one device (a mesh whose expert axis has one device): the
  whole batch's work at that capacity, the reference for the per-device share;
- ``8 devices, placement``: the experts split along ``expert`` by the sharding rules but the program traced
  without a mesh in context (what the library did before: XLA partitions the single-device program);
- ``8 devices, all-to-all``: traced under ``jax.set_mesh(mesh)``: tokens dispatched to their experts' devices.

Reported per variant: the cost analysis's FLOPs of one device's program (the compiled SPMD module is one
device's), its ratio to the ``1 device, capacity`` program at the same capacity, and each collective's count and
the largest array it moves (elements). No times: 8 CPU devices forced on a shared 2-core machine measure nothing
about an accelerator. ``--quick``: a small block (a smoke run). ``--out PATH`` writes the results JSON with
provenance (:class:`benchmarks.common.Recorder`); ``benchmarks.moe_step`` runs this in a child process and keeps
its record.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import lora_jax as lora
from benchmarks.common import Recorder, table
from lora_jax import sharding
from lora_jax.models import moe

SOURCES = (
    "lora_jax/models/moe.py",
    "lora_jax/sharding.py",
    "lora_jax/ops.py",
    "lora_jax/core.py",
    "benchmarks/moe_dispatch.py",
    "benchmarks/common.py",
)
DEVICES = 8
COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")


def collectives(hlo: str) -> dict[str, dict]:
    """Each kind of collective in a compiled module's HLO text: how many, and the largest array moved."""
    found: dict[str, dict] = {}
    for line in hlo.splitlines():
        m = re.search(rf"= (.*?) ({'|'.join(COLLECTIVES)})(-start)?\(", line)
        if m:
            sizes = [
                int(np.prod([int(d) for d in dims.split(",") if d]))
                for dims in re.findall(r"[a-z]+\d*\[([\d,]*)\]", m.group(1))
            ]
            c = found.setdefault(m.group(2), {"count": 0, "largest_elements": 0})
            c["count"] += 1
            c["largest_elements"] = max(c["largest_elements"], max(sizes, default=0))
    return found


def make_block(experts: int, d: int, f: int, r: int, tokens: int):
    ks = jax.random.split(jax.random.key(0), 5)
    params = {
        "mlp": {
            "gate": {"kernel": jax.random.normal(ks[0], (d, experts)) * d**-0.5},
            "experts": {
                "gate_up_proj": jax.random.normal(ks[1], (experts, d, 2 * f)) * d**-0.5,
                "down_proj": jax.random.normal(ks[2], (experts, f, d)) * f**-0.5,
            },
        }
    }
    ads = lora.init(params, r=r, alpha=2 * r, targets="experts", key=ks[3])
    ads = jax.tree_util.tree_map(
        lambda ad: dataclasses.replace(ad, b=jnp.full(ad.b.shape, 0.01)), ads, is_leaf=lora.is_adapter
    )
    x = jax.random.normal(ks[4], (tokens, d))
    return params, ads, x


def block_loss(ads, x, params, *, top_k: int, mesh=None, capacity_factor=None):
    """The scalar whose gradient the programs compute; ``(loss, dropped pairs)``."""
    e = lora.wrap(params, ads)["mlp"]["experts"]
    routing = moe.route_sharded(x @ params["mlp"]["gate"]["kernel"], top_k, mesh=sharding.expert_mesh())
    if mesh is None:
        y, dropped = moe.experts_glu(x, routing, gate_up=e["gate_up_proj"], down=e["down_proj"]), jnp.zeros((), int)
    else:
        y, dropped, _ = moe.experts_glu_sharded(
            x, routing, mesh=mesh, gate_up=e["gate_up_proj"], down=e["down_proj"], capacity_factor=capacity_factor
        )
    return jnp.mean(y.astype(jnp.float32) ** 2), dropped


def compiled(fn, *args, mesh=None):
    grad = jax.jit(jax.value_and_grad(fn, argnums=(0, 1), has_aux=True))
    if mesh is None:
        c = grad.lower(*args).compile()
        return c, grad(*args)
    with jax.set_mesh(mesh):
        c = grad.lower(*args).compile()
        return c, grad(*args)


def one_mesh(expert_devices: int):
    from jax.sharding import Mesh

    return Mesh(
        np.asarray(jax.devices()[:expert_devices]).reshape(1, 1, expert_devices),
        sharding.BATCH_AXES + (sharding.EXPERT_AXIS,),
    )


def section(experts: int, args) -> tuple[list[dict], dict]:
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    k, d, f, t = args.top_k, args.hidden, args.width, args.tokens
    params, ads, x = make_block(experts, d, f, args.r, t)
    mesh8 = sharding.make_mesh(1, 1, expert=DEVICES)
    p8 = jax.device_put(params, sharding.tree_shardings(params, mesh8))
    a8 = jax.device_put(ads, sharding.tree_shardings(ads, mesh8))
    x8 = jax.device_put(x, NamedSharding(mesh8, P(sharding.batch_axes(mesh8))))
    rows, losses = [], {}

    def record(name, cf, comp, out, per_device_tokens, reference=None):
        flops = float(comp.cost_analysis().get("flops", float("nan")))
        (loss, dropped), _ = out
        losses[name if cf == "-" else f"{name}, capacity factor {cf}"] = float(loss)
        cap = None if cf == "-" else moe.expert_capacity(per_device_tokens, k, experts, cf)
        row = {
            "E": experts,
            "variant": name,
            "capacity_factor": "none (dropless)" if cf is None else cf,
            "capacity": cap,
            "flops_per_device": flops,
            "dropped_pairs": int(dropped),
            "dropped_share": int(dropped) / (t * k),
            "collectives": collectives(comp.as_text()),
        }
        row["to_1dev_capacity"] = flops / reference if reference else None
        rows.append(row)
        return flops

    plain = lambda a, x, p: block_loss(a, x, p, top_k=k)  # noqa: E731
    record("1 device, grouped", "-", *compiled(plain, ads, x, params), t)
    record("8 devices, placement", "-", *compiled(plain, a8, x8, p8), t)
    for cf in args.capacity_factors:
        one = one_mesh(1)
        ref = record(
            "1 device, capacity",
            cf,
            *compiled(
                lambda a, x, p, cf=cf: block_loss(a, x, p, top_k=k, mesh=one, capacity_factor=cf), ads, x, params
            ),
            t,
        )
        record(
            "8 devices, all-to-all",
            cf,
            *compiled(
                lambda a, x, p, cf=cf: block_loss(a, x, p, top_k=k, mesh=sharding.expert_mesh(), capacity_factor=cf),
                a8,
                x8,
                p8,
                mesh=mesh8,
            ),
            t // DEVICES,
            reference=ref,
        )
    grouped_fwd = 2 * t * k * 3 * d * f  # the routed rows' three expert products, forward, grouped exactly
    info = {
        "experts": experts,
        "top_k": k,
        "hidden": d,
        "expert_width": f,
        "tokens": t,
        "r": args.r,
        "grouped_expert_forward_flops": grouped_fwd,
        "losses": losses,
    }
    return rows, info


def markdown(record: dict) -> str:
    """The record as a Markdown table (for a ``benchmarks.report`` renderer): per expert count, one device's
    program FLOPs for each variant, the share of the whole batch's at the same capacity, the dropped pairs and the
    largest array an all-gather / all-reduce moves, in elements and in units of one device's tokens x hidden."""
    rows = []
    for r in record["rows"]:
        m = record["models"][f"E={r['E']}"]
        own = m["tokens"] // record["devices"] * m["hidden"]  # one device's tokens x hidden
        c = r["collectives"]

        def largest(kind):
            n = c.get(kind, {}).get("largest_elements", 0)
            return "-" if not n else f"{n:,} ({n / own:.3g}x)"

        share = "-" if r["to_1dev_capacity"] is None else f"{r['to_1dev_capacity']:.3f}"
        rows.append(
            f"| {r['E']} | {r['variant']} | {r['capacity_factor']} | {r['flops_per_device'] / 1e9:,.2f} | "
            f"{share} | {r['dropped_share']:.1%} | {c.get('all-to-all', {}).get('count', 0)} | "
            f"{largest('all-gather')} | {largest('all-reduce')} |"
        )
    m = next(iter(record["models"].values()))
    head = (
        f"One MoE block (d={m['hidden']}, experts of width {m['expert_width']}, top-{m['top_k']}, LoRA r={m['r']} "
        f"on every expert, {m['tokens']} tokens), forward + backward, {record['devices']} CPU devices, "
        "expert axis of 8; the largest arrays in elements and in units of one device's tokens x hidden:"
    )
    return "\n".join(
        [
            head,
            "",
            "| E | program | capacity factor | GFLOP per device | share of 1 device at the same "
            "capacity | pairs dropped | all-to-alls | largest all-gather | largest all-reduce |",
            "|---|---|---|---|---|---|---|---|---|",
            *rows,
        ]
    )


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a small block: a smoke run")
    ap.add_argument("--experts", type=int, nargs="+", default=[8, 32])
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--r", type=int, default=8)
    ap.add_argument(
        "--capacity-factors",
        type=lambda s: None if s == "none" else float(s),
        nargs="+",
        default=[None, 1.25],
        help="'none': never drop a token",
    )
    ap.add_argument("--out", default=None, help="write the results JSON here (with provenance)")
    args = ap.parse_args(argv)
    if args.quick:
        args.experts, args.hidden, args.width, args.tokens, args.r = [8], 32, 16, 256, 4
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    if jax.device_count() < DEVICES:
        raise SystemExit(
            f"moe_dispatch needs {DEVICES} devices, found {jax.device_count()}: run with "
            f"XLA_FLAGS=--xla_force_host_platform_device_count={DEVICES}"
        )
    recorder = Recorder("moe_dispatch", SOURCES, argv)
    t0 = time.perf_counter()
    rows, models = [], {}
    for experts in args.experts:
        r, info = section(experts, args)
        rows += r
        models[f"E={experts}"] = info
    show = [
        {
            **{k: v for k, v in row.items() if k != "collectives"},
            "all-to-all": row["collectives"].get("all-to-all", {}).get("count", 0),
            "largest all-gather": row["collectives"].get("all-gather", {}).get("largest_elements", 0),
            "largest all-reduce": row["collectives"].get("all-reduce", {}).get("largest_elements", 0),
        }
        for row in rows
    ]
    print(
        table(
            show,
            [
                "E",
                "variant",
                "capacity_factor",
                "capacity",
                "flops_per_device",
                "to_1dev_capacity",
                "dropped_share",
                "all-to-all",
                "largest all-gather",
                "largest all-reduce",
            ],
        )
    )
    payload = {
        "config": vars(args),
        "devices": DEVICES,
        "models": models,
        "rows": rows,
        "notes": [
            "flops_per_device: XLA cost analysis of one device's compiled program (forward + backward of the block).",
            "XLA:CPU lowers ragged_dot to a product masked per expert: '1 device, grouped' and '8 devices, placement' "
            "count E x the grouped work; the capacity variants use batched products and count what they compute.",
            "largest all-gather / all-reduce: elements of the largest array one such collective moves; the tokens' "
            "activations are tokens x hidden elements.",
        ],
        "wall_s": time.perf_counter() - t0,
    }
    print()
    print(markdown(payload))
    if args.out:
        out = Path(args.out)
        path = recorder.write(out.stem, payload, out.parent)
        print(f"\nwrote {path}")
    return {"provenance": recorder.provenance(), **payload}


if __name__ == "__main__":
    main()
