"""The benchmark scripts' own logic (they are run by hand, never in CI): the load-test client stops by itself."""

from __future__ import annotations

import http.server
import threading
import time

from benchmarks.serve_load import free_port, load


class _Echo(http.server.BaseHTTPRequestHandler):
    def do_POST(self):  # noqa: N802 (http.server's naming)
        self.rfile.read(int(self.headers["Content-Length"]))
        time.sleep(0.01)
        body = b'{"predictions": []}'
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_load_client_stops_at_its_deadline_and_counts_errors():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Echo)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/invocations"
        r = load(url, ["a text", "another"], clients=4, seconds=1.0)
        assert r["wall_s"] < 3 and r["requests"] > 8 and r["error_rate"] == 0
        assert 0 < r["p50_ms"] <= r["p99_ms"]
    finally:
        server.shutdown()
    down = load(f"http://127.0.0.1:{free_port()}/invocations", ["x"], clients=2, seconds=0.5, timeout=1)
    assert down["wall_s"] < 3 and down["requests"] > 0 and down["error_rate"] == 1
