"""Event streams are not an amplifier: a job's run time with 400 open event streams on it
(nobody reading them) against the same job with none, through the real service.

A private service (redis-server, gateway, one built-in-model worker). Each round runs the
baseline job, then the loaded one: a blocker job keeps the worker busy while the measured job
waits queued and `--streams` raw connections open its event stream and never read; then the
blocker is canceled and the job runs. Run time is the job document's `timings.run_s` (the
worker's claim to its finish). While the loaded job runs, /healthz is timed too. Rounds
alternate, so drift in machine speed hits both; the medians and their ratio are printed.
Target (issue 20): ratio <= 1.10 on CPU.

    python bench/stream_load.py [--streams 400] [--steps 100] [--rounds 3]
"""

from __future__ import annotations

import argparse
import socket
import statistics
import sys
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _service import service

from tests.stack import Gateway, wait_for_job


def _gauge(client: httpx.Client, name: str) -> float:
    for line in client.get("/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return 0.0


def _submit(client: httpx.Client, steps: int, prompt: str, n: int = 4) -> str:
    # The built-in model takes at most 100 steps: n images make a job long enough.
    body = {"prompt": prompt, "steps": steps, "seed": 1, "n": n}
    job: str = client.post("/v1/generations", json=body).json()["id"]
    return job


def _until_running(client: httpx.Client, job: str) -> None:
    while client.get(f"/v1/generations/{job}").json()["status"] != "running":
        time.sleep(0.02)


def one_run(gateway: Gateway, steps: int, streams: int) -> tuple[float, list[float]]:
    """(run seconds of the measured job, /healthz latencies while it ran)."""
    host, port = gateway.base_url.removeprefix("http://").split(":")
    socks: list[socket.socket] = []
    latencies: list[float] = []
    with gateway.client() as client:
        blocker = _submit(client, 100, "blocker", n=8)
        _until_running(client, blocker)
        job = _submit(client, steps, "a small red circle at the top left on a white background")
        request = (
            f"GET /v1/generations/{job}/events HTTP/1.1\r\nHost: {host}\r\n"
            "Accept: text/event-stream\r\n\r\n"
        ).encode()
        for _ in range(streams):
            sock = socket.create_connection((host, int(port)))
            # A small receive buffer: the kernel soon stops taking what the client never reads.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.sendall(request)
            socks.append(sock)
        while _gauge(client, "imagegen_gateway_event_streams") < streams:
            time.sleep(0.05)
        client.delete(f"/v1/generations/{blocker}")
        done = threading.Event()

        def probe() -> None:
            with gateway.client() as prober:
                while not done.is_set():
                    started = time.perf_counter()
                    prober.get("/healthz")
                    latencies.append(time.perf_counter() - started)
                    done.wait(0.25)

        thread = threading.Thread(target=probe, daemon=True)
        thread.start()
        doc = wait_for_job(client, job, timeout_s=600)
        done.set()
        thread.join()
        for sock in socks:
            sock.close()
        while _gauge(client, "imagegen_gateway_event_streams") > 0:
            time.sleep(0.05)
    assert doc["status"] == "succeeded", doc
    return float(doc["timings"]["run_s"]), latencies  # type: ignore[index]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=400)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    gateway_env = {"IMAGEGEN_MAX_STREAMS_PER_KEY": str(args.streams + 10)}
    with service(threads="1", gateway_env=gateway_env) as gateway:
        one_run(gateway, 10, 0)  # warm both paths
        base: list[float] = []
        loaded: list[float] = []
        health: list[float] = []
        health_base: list[float] = []
        for r in range(args.rounds):
            run_s, lat = one_run(gateway, args.steps, 0)
            base.append(run_s)
            health_base += lat
            run_s, lat = one_run(gateway, args.steps, args.streams)
            loaded.append(run_s)
            health += lat
            print(f"round {r + 1}: no streams {base[-1]:.2f}s, {args.streams} streams {run_s:.2f}s")
        with gateway.client() as client:
            dropped = _gauge(client, "imagegen_gateway_event_frames_dropped_total")
    b, lo = statistics.median(base), statistics.median(loaded)
    print(f"job of 4 images x {args.steps} steps, built-in model, median of {args.rounds} rounds")
    calm = statistics.median(health_base) * 1000
    print(f"no streams:          {b:.3f} s  (/healthz median {calm:.1f} ms)")
    print(
        f"{args.streams} open streams:   {lo:.3f} s  (/healthz median "
        f"{statistics.median(health) * 1000:.1f} ms, max {max(health) * 1000:.1f} ms)"
    )
    print(f"progress/preview frames dropped for streams that did not read: {dropped:.0f}")
    print(f"ratio {lo / b:.3f} (target <= 1.10)")


if __name__ == "__main__":
    main()
