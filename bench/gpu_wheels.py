"""The wheels a GPU machine needs to run the service: every distribution the gateway and the
worker import at run time (`imagegen[worker,local]` and what they require, read from this
venv, so at the versions of the lock), less what the device image already holds
(../.library/device/KINDS.md). Printed one `name==version` per line for `bench/gpu_wheels.sh`.

    python bench/gpu_wheels.py            # the pins
    python bench/gpu_wheels.py --missing  # runtime imports the list would not cover (none)
"""

from __future__ import annotations

import argparse
import importlib.metadata as metadata
import re

from packaging.requirements import Requirement

# What the device image holds (KINDS.md, "Python packages already there"): carried only when
# the service needs another version of one, which it does not.
DEVICE_HAS = set(
    [
        "accelerate",
        "anyio",
        "certifi",
        "charset-normalizer",
        "click",
        "filelock",
        "fsspec",
        "h11",
        "hf-xet",
        "httpcore",
        "httpx",
        "huggingface-hub",
        "idna",
        "jinja2",
        "markupsafe",
        "numpy",
        "packaging",
        "peft",
        "pillow",
        "prometheus-client",
        "psutil",
        "pyyaml",
        "regex",
        "requests",
        "rich",
        "safetensors",
        "setuptools",
        "shellingham",
        "tokenizers",
        "torch",
        "tqdm",
        "transformers",
        "triton",
        "typer",
        "typing-extensions",
        "urllib3",
        "uvloop",
        "pygments",
        "markdown-it-py",
        "mdurl",
        "mpmath",
        "networkx",
        "sympy",
        "zipp",
        "opencv-python-headless",
    ]
)
ROOT_EXTRAS = ("worker", "local")


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def closure(project: str = "imagegen", extras: tuple[str, ...] = ROOT_EXTRAS) -> dict[str, str]:
    """Every distribution `project[extras]` needs at run time, with its installed version."""
    seen: dict[str, str] = {}
    stack: list[tuple[str, tuple[str, ...]]] = [(project, extras)]
    while stack:
        name, wanted = stack.pop()
        dist = metadata.distribution(name)
        key = canonical(dist.metadata["Name"])
        if key in seen and not wanted:
            continue
        seen[key] = dist.version
        for line in dist.requires or []:
            requirement = Requirement(line)
            environment = {"extra": ""}
            marker = requirement.marker
            if marker is not None and not any(
                marker.evaluate({**environment, "extra": extra}) for extra in ("", *wanted)
            ):
                continue
            if canonical(requirement.name) in seen or canonical(requirement.name) == "torch":
                continue
            try:
                metadata.distribution(requirement.name)
            except metadata.PackageNotFoundError:
                continue  # another platform's, or an optional one not installed here
            stack.append((requirement.name, tuple(sorted(requirement.extras))))
    seen.pop(canonical(project), None)
    return seen


def wheels() -> list[str]:
    needed = closure()
    return sorted(
        f"{name}=={version}" for name, version in needed.items() if name not in DEVICE_HAS
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--missing", action="store_true")
    args = parser.parse_args()
    if args.missing:
        carried = {canonical(pin.split("==")[0]) for pin in wheels()}
        for name in sorted(set(closure()) - carried - DEVICE_HAS):
            print(name)
        return
    print("\n".join(wheels()))


if __name__ == "__main__":
    main()
