"""Throughput with 16 concurrent clients, dynamic batching on vs off (CPU, built-in model).

Each client submits jobs back to back (submit, follow events, download) for a fixed time;
the figure is images per second, for one worker with batching off (one job per loop) and on
(up to 16 images per loop), in the same run. On CPU the batch loop runs batch-invariant
(each image computed alone, so batched images are byte-identical to solo ones), so little
gain is expected there; `--variant` also measures the non-invariant batch.

    python bench/batching_throughput.py [--seconds 30] [--clients 16] [--variant]
"""

from __future__ import annotations

import argparse

from _service import service, throughput


def measure(env: dict[str, str], clients: int, seconds: float) -> tuple[float, int]:
    with service(worker_env=env) as gateway:
        return throughput(
            gateway,
            clients,
            seconds,
            lambda c, k: {"prompt": f"a large blue square {c}", "seed": c * 1000 + k},
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=30)
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
    results = {}
    for name, env in configs.items():
        results[name] = measure(env, args.clients, args.seconds)
        print(f"{name:28s} {results[name][0]:6.2f} images/s ({results[name][1]} jobs)", flush=True)
    base = results["batching off"][0]
    for name in list(configs)[1:]:
        print(f"ratio {name} / off: {results[name][0] / base:.3f}")


if __name__ == "__main__":
    main()
