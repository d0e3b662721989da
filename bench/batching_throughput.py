"""Throughput with 16 concurrent clients, dynamic batching on vs off (CPU, built-in model).

Each client submits jobs back to back (submit, follow events, download) for a fixed time;
the figure is images per second, for one worker with batching off (one job per loop) and on
(up to 16 images per loop), in the same run. On CPU the batch loop runs batch-invariant
(each image computed alone, so batched images are byte-identical to solo ones), so little
gain is expected there; `--variant` also measures the non-invariant batch. Every variant's
service runs from the start, and the measurement windows alternate between them over
`--rounds` rounds (medians), so that a neighbour's load on a shared machine hits all alike.

    python bench/batching_throughput.py [--seconds 10] [--rounds 3] [--clients 16] [--variant]
"""

from __future__ import annotations

import argparse
from contextlib import ExitStack

from _service import Gateway, median, service, throughput


def measure(gateway: Gateway, clients: int, seconds: float) -> tuple[float, int]:
    return throughput(
        gateway,
        clients,
        seconds,
        lambda c, k: {"prompt": f"a large blue square {c}", "seed": c * 1000 + k},
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10, help="one measurement window")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--variant", action="store_true", help="also the non-invariant batch")
    args = parser.parse_args()
    configs = {
        "batching off": {"IMAGEGEN_BATCH_MAX_IMAGES": "1"},
        "batching on": {"IMAGEGEN_BATCH_MAX_IMAGES": "16"},
    }
    if args.variant:
        configs["batching on, not invariant"] = {
            "IMAGEGEN_BATCH_MAX_IMAGES": "16",
            "IMAGEGEN_BATCH_INVARIANT": "off",
        }
    rates: dict[str, list[float]] = {name: [] for name in configs}
    with ExitStack() as stack:
        gateways = {
            name: stack.enter_context(service(worker_env=env)) for name, env in configs.items()
        }
        for round_ in range(args.rounds):
            names = list(configs) if round_ % 2 == 0 else list(configs)[::-1]
            for name in names:
                rate, jobs = measure(gateways[name], args.clients, args.seconds)
                rates[name].append(rate)
                print(
                    f"round {round_ + 1} {name:28s} {rate:6.2f} images/s ({jobs} jobs)", flush=True
                )
    base = median(rates["batching off"])
    for name, values in rates.items():
        print(f"{name:28s} {median(values):6.2f} images/s (median of {len(values)})")
    for name in list(configs)[1:]:
        print(f"ratio {name} / off: {median(rates[name]) / base:.3f}")


if __name__ == "__main__":
    main()
