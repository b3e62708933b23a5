"""Start `lfm-engine serve` (uvicorn in a thread, 127.0.0.1, ephemeral port) for the server tests."""
from __future__ import annotations

import argparse
import threading
import time

CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }} {{ m['content'] }} {% endfor %}"
                 "{% if add_generation_prompt %}w3{% endif %}")


class Running:
    def __init__(self, argv):
        from lfm_engine.cli import serve as cli_serve

        ap = argparse.ArgumentParser()
        cli_serve.add_parser(ap.add_subparsers())
        args = ap.parse_args(["serve"] + list(argv) + ["--port", "0"])
        self.server, self.sock, self.app = cli_serve.build(args)
        self.thread = threading.Thread(target=self.server.run, kwargs=dict(sockets=[self.sock]), daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started and time.monotonic() < deadline:
            time.sleep(0.02)
        assert self.server.started, "server did not start within 30 s"
        host, port = self.sock.getsockname()[:2]
        self.url = f"http://{host}:{port}"

    def close(self):
        self.server.should_exit = True
        self.thread.join(15)
        self.sock.close()
        self.app.close()
