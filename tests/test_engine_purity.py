"""The engine is sans-IO: importing and using it loads no event loop, socket, clock or thread.

(The interpreter itself may load ``time`` or ``threading`` at start-up, through site hooks;
what counts is what importing and driving the engine adds.)"""

from __future__ import annotations

import ast
import pathlib
import subprocess
import sys

ENGINE = pathlib.Path(__file__).resolve().parent.parent / "engine"
FORBIDDEN = {"asyncio", "socket", "time", "threading", "selectors", "uvloop", "httpx"}


def test_importing_the_engine_loads_no_io_module() -> None:
    code = (
        "import sys, json\n"
        "before = set(sys.modules)\n"
        "import wirechat, wirechat.engine\n"
        "from wirechat.engine import ServerConnection, EngineConfig\n"
        "conn = ServerConnection(EngineConfig(), 0.0)\n"
        "conn.receive_data(b'GET /health HTTP/1.1\\r\\nHost: a\\r\\n\\r\\n', 1.0)\n"
        "assert conn.data_to_send().startswith(b'HTTP/1.1 200')\n"
        "loaded = set(sys.modules) - before\n"
        f"print(json.dumps(sorted(m for m in {sorted(FORBIDDEN)!r} if m in loaded)))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "[]", result.stdout


def test_engine_sources_import_neither_io_nor_transport_nor_providers() -> None:
    offenders = []
    for path in ENGINE.rglob("*.py"):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module] if node.level == 0 else [f".{node.module}"]
            for name in names:
                root = name.split(".")[0]
                if root in FORBIDDEN or "transport" in name or "providers" in name:
                    offenders.append(f"{path.name}: {name}")
    assert offenders == []
