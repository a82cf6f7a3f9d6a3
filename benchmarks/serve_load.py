"""Serving under load: `mlflow models serve` on a registered model (default: the champion), 127.0.0.1 only.

For each text size (short: one of the shortest test texts per request; long: one of the longest) and each number
of concurrent clients (1, 4, 16), the clients post one text per request for `--seconds`, each waiting for its
answer before the next request (closed loop). Figures: requests/s, p50/p99 latency, error rate. The same texts
through the served model in-process (TextPredictor, one text per call, one thread) give the ceiling a server could
reach per worker; the ratio says how much the HTTP layer costs. Needs a finished `dvc repro` and a champion
(`tunepipe promote`), or `--model models:/NAME/VERSION`.

    python benchmarks/serve_load.py [--seconds 60] [--clients 1 4 16] [--workers 1] [--model URI]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def post(url: str, texts: list[str], timeout: float) -> int:
    """One request; the HTTP status (0 for a connection failure or timeout)."""
    req = urllib.request.Request(url, data=json.dumps({"inputs": texts}).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as res:
            res.read()
            return res.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except (urllib.error.URLError, OSError):
        return 0


def load(url: str, texts: list[str], clients: int, seconds: float, timeout: float = 30.0) -> dict:
    """`clients` threads post texts (one per request, round robin) until `seconds` have passed; each stops by
    itself at the deadline (a request in flight then is waited for, at most `timeout`)."""
    deadline = time.monotonic() + seconds
    results: list[tuple[float, int]] = []
    lock = threading.Lock()

    def client(k: int) -> None:
        i = k
        while time.monotonic() < deadline:
            t0 = time.monotonic()
            status = post(url, [texts[i % len(texts)]], timeout)
            with lock:
                results.append((time.monotonic() - t0, status))
            i += clients

    threads = [threading.Thread(target=client, args=(k,), daemon=True) for k in range(clients)]
    start = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(seconds + timeout + 5)
    wall = time.monotonic() - start
    ok = [lat for lat, status in results if status == 200]
    ms = np.asarray(ok or [float("nan")]) * 1000
    return {"clients": clients, "requests": len(results), "requests_per_s": len(ok) / wall,
            "p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)),
            "error_rate": 1 - len(ok) / max(len(results), 1), "wall_s": round(wall, 1)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(model_uri: str, workers: int, log: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    cmd = [sys.executable, "-m", "mlflow", "models", "serve", "-m", model_uri, "--env-manager", "local",
           "-h", "127.0.0.1", "-p", str(port), "-w", str(workers)]
    proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env)
    base = f"http://127.0.0.1:{port}"
    for _ in range(240):
        if proc.poll() is not None:
            raise SystemExit(f"mlflow models serve exited ({proc.returncode}); see {log}")
        try:
            with urllib.request.urlopen(f"{base}/ping", timeout=2):
                return proc, f"{base}/invocations"
        except OSError:
            time.sleep(0.5)
    proc.terminate()
    raise SystemExit(f"mlflow models serve did not answer within 2 minutes; see {log}")


def in_process(texts: list[str], seconds: float) -> float:
    """Texts/s of the served model's own predictor, one text per call, for at most `seconds`."""
    from tunepipe.paths import EXPORT
    from tunepipe.serving.pyfunc_model import TextPredictor

    predictor = TextPredictor(EXPORT)
    predictor.predict(texts[:5])
    n, start = 0, time.monotonic()
    while time.monotonic() - start < seconds:
        predictor.predict([texts[n % len(texts)]])
        n += 1
    return n / (time.monotonic() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="MLflow model URI (default: models:/<tracking.model_name>@champion)")
    ap.add_argument("--seconds", type=float, default=60.0, help="per figure (default 60)")
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--workers", type=int, default=1, help="server worker processes (mlflow models serve -w)")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "serve_load.md")
    args = ap.parse_args()
    os.chdir(REPO)
    import pandas as pd

    from tunepipe import tracking
    from tunepipe.modeling import cpu_isa, cpu_model
    from tunepipe.params import load_params
    from tunepipe.paths import TEST_SPLIT

    p = load_params()
    os.environ["MLFLOW_TRACKING_URI"] = tracking.tracking_uri(p.tracking)
    uri = args.model or f"models:/{p.tracking.model_name}@champion"
    texts = sorted(pd.read_parquet(TEST_SPLIT)["text"].astype(str).tolist(), key=len)
    sizes = {"short": texts[:200], "long": texts[-200:]}
    cpu = f"{cpu_model()} ({cpu_isa()}), {os.cpu_count()} cores"
    print(f"serve load: {uri}, {args.workers} worker(s), {args.seconds:g} s per figure; {cpu}", flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        proc, url = serve(uri, args.workers, Path(tmp) / "serve.log")
        try:
            for size, sample in sizes.items():
                ceiling = in_process(sample, min(args.seconds, 20.0))
                chars = sum(map(len, sample)) / len(sample)
                for clients in args.clients:
                    r = load(url, sample, clients, args.seconds)
                    r.update(size=f"{size} (~{chars:.0f} chars)", in_process=ceiling)
                    rows.append(r)
                    print(f"  {r['size']:<18} {clients:>2} clients  {r['requests_per_s']:7.1f} req/s  p50 "
                          f"{r['p50_ms']:7.1f} ms  p99 {r['p99_ms']:7.1f} ms  errors {r['error_rate']:.1%}  "
                          f"(in-process {ceiling:.1f} texts/s: {r['requests_per_s'] / ceiling:.2f}x)", flush=True)
        finally:
            proc.terminate()
            proc.wait(30)
    table = ["| texts | clients | requests/s | p50 ms | p99 ms | errors | in-process texts/s | server / in-process |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    table += [f"| {r['size']} | {r['clients']} | {r['requests_per_s']:.1f} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | "
              f"{r['error_rate']:.1%} | {r['in_process']:.1f} | {r['requests_per_s'] / r['in_process']:.2f}x |"
              for r in rows]
    args.out.write_text(f"# Serving under load\n\n`mlflow models serve` ({args.workers} worker(s), "
                        f"`--env-manager local`) on {uri}, one text per request, {args.seconds:g} s per row; {cpu}; "
                        "`python benchmarks/serve_load.py`.\n\n" + "\n".join(table) + "\n")
    print(f"written {args.out}")


if __name__ == "__main__":
    main()
