"""A gateway that cannot serve says so and exits: a port already taken ends the process with
uvicorn's start-up failure status (3) after the lifespan's shutdown, instead of a process that
logs the bind error and then waits forever (what a supervisor cannot restart)."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

from imagegen.cli.redis_server import RedisServer
from tests.stack import service_env, start_process

# uvicorn's exit status when the server cannot start (uvicorn.server.STARTUP_FAILURE).
STARTUP_FAILURE = 3


def test_a_gateway_whose_port_is_taken_exits_with_the_startup_failure_status(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        env = service_env(
            redis_server.url, {"IMAGEGEN_HOST": "127.0.0.1", "IMAGEGEN_PORT": str(port)}
        )
        # The real command: the hang was in its event loop (uvloop) and the event hub it starts.
        proc = start_process([sys.executable, "-m", "imagegen", "api"], env, tmp_path / "gw.log")
        try:
            status = proc.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.process.kill()
            raise AssertionError(f"the gateway did not exit:\n{proc.log()[-3000:]}") from None
    log = proc.log()
    assert status == STARTUP_FAILURE, log[-3000:]
    assert "address already in use" in log
    assert "Application shutdown complete." in log, log[-3000:]
