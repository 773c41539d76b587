"""Latency of an ordinary client while others attack the server: the figures behind tests/test_serve_guards.py.

A `deltatune serve` server (the embedded SmolLM2-135M-Instruct, fp32, default limits but a 5 s request
timeout) runs in this process; one client sends completions of 8 tokens back to back and records each
latency. Phases of `--seconds` each, the attackers in a second process:

- quiet: nobody else;
- slowloris: 400 connections each sending a request's headers one byte every 0.5 s;
- bodies: 8 clients declaring 20 MB bodies and sending them as fast as the server reads (it answers 413 from
  the header, so they reconnect);
- big prompt: 4 clients posting 1.9 MB prompts (under the 2 MiB limit: tokenized, in a worker thread, then
  400 for the context);
- flood: 1,500 idle connections held open (the cap is 1,024: the rest get 503 at once).

Reported per phase: median and p99 latency, requests completed, and the server's rejected-request counters.

    flock /tmp/deltatune-bench.lock python bench/bench_serve_attack.py
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import socket
import statistics
import sys
import threading
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import _common as C  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def attack(kind: str, addr: tuple[str, int], stop) -> None:
    def slowloris() -> None:
        socks = []
        for _ in range(400):
            try:
                socks.append(socket.create_connection(addr, timeout=5))
            except OSError:
                pass
        head = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        i = 0
        while not stop.is_set():
            for s in list(socks):
                try:
                    s.send(head[i % len(head): i % len(head) + 1])
                except OSError:  # timed out by the server: open another
                    socks.remove(s)
                    try:
                        socks.append(socket.create_connection(addr, timeout=5))
                    except OSError:
                        pass
            i += 1
            time.sleep(0.5)

    def bodies() -> None:
        def one() -> None:
            while not stop.is_set():
                try:
                    with socket.create_connection(addr, timeout=5) as s:
                        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 20000000\r\n\r\n")
                        s.sendall(b"x" * 1_000_000)
                        s.recv(4096)
                except OSError:
                    pass
        threads = [threading.Thread(target=one, daemon=True) for _ in range(8)]
        [t.start() for t in threads]
        stop.wait()

    def big_prompt() -> None:
        body = json.dumps({"model": "base", "prompt": "word " * 380_000, "max_tokens": 4}).encode()

        def one() -> None:
            while not stop.is_set():
                try:
                    urllib.request.urlopen(urllib.request.Request(f"http://{addr[0]}:{addr[1]}/v1/completions", body),
                                           timeout=60).read()
                except Exception:  # noqa: BLE001  (400 expected)
                    pass
        threads = [threading.Thread(target=one, daemon=True) for _ in range(4)]
        [t.start() for t in threads]
        stop.wait()

    def flood() -> None:
        socks = []
        for _ in range(1500):
            try:
                socks.append(socket.create_connection(addr, timeout=5))
            except OSError:
                pass
        stop.wait()

    {"slowloris": slowloris, "bodies": bodies, "big_prompt": big_prompt, "flood": flood}[kind]()


def client_latencies(url: str, seconds: float) -> list[float]:
    body = json.dumps({"model": "base", "prompt": "The capital of France is", "max_tokens": 8, "temperature": 0}).encode()
    out, end = [], time.monotonic() + seconds
    while time.monotonic() < end:
        start = time.perf_counter()
        try:
            urllib.request.urlopen(urllib.request.Request(url + "/v1/completions", body), timeout=60).read()
            out.append(time.perf_counter() - start)
        except Exception as exc:  # noqa: BLE001
            out.append(float("inf"))
            print("client error:", exc, flush=True)
    return out


def main() -> None:
    import uvicorn

    from deltatune.models import load_model
    from deltatune.serve import Engine
    from deltatune.serve.guards import Limits
    from deltatune.serve.registry import AdapterRegistry
    from deltatune.serve.server import Server

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=15)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="serve_attack")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer = load_model()
    server = Server(Engine(model, tokenizer), AdapterRegistry(model), base_name="base",
                    limits=Limits(request_timeout=5.0))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    addr = sock.getsockname()
    uv = uvicorn.Server(server.uvicorn_config())
    threading.Thread(target=uv.run, kwargs={"sockets": [sock]}, daemon=True).start()
    while not uv.started:
        time.sleep(0.05)
    url = f"http://{addr[0]}:{addr[1]}"
    rows = []
    for phase in ("quiet", "slowloris", "bodies", "big_prompt", "flood"):
        stop = mp.Event()
        attacker = None if phase == "quiet" else mp.Process(target=attack, args=(phase, addr, stop), daemon=True)
        if attacker is not None:
            attacker.start()
            time.sleep(2)  # let the attack build up
        with C.LoadMonitor() as load:
            lat = client_latencies(url, args.seconds)
        stop.set()
        if attacker is not None:
            attacker.join(10)
            if attacker.is_alive():
                attacker.kill()
        time.sleep(1)
        ok = sorted(x for x in lat if x != float("inf"))
        row = {"phase": phase, "requests": len(ok), "failed": len(lat) - len(ok),
               "median_s": statistics.median(ok) if ok else None,
               "p99_s": ok[min(len(ok) - 1, int(0.99 * len(ok)))] if ok else None, "load": load.mean,
               "loadavg": os.getloadavg()[0]}
        rows.append(row)
        print(row, flush=True)
    rejected = [line for line in urllib.request.urlopen(url + "/metrics").read().decode().splitlines()
                if line.startswith("deltatune_rejected_requests_total")]
    uv.should_exit = True
    meta = {"cpu": C.cpu_name(), "torch": torch.__version__, "threads": args.threads, "seconds": args.seconds,
            "date": time.strftime("%Y-%m-%d %H:%M"), "rejected": rejected}
    lines = [f"# Latency of one client under attack ({meta['cpu']}, torch {meta['torch']}, {args.threads} thread, "
             f"SmolLM2-135M fp32, 8-token completions, {args.seconds:g} s a phase)", "",
             "| phase | completed | failed | median | p99 | other load |", "|---|---|---|---|---|---|"]
    for r in rows:
        fmt = lambda x: "-" if x is None else f"{x * 1000:.0f} ms"  # noqa: E731
        lines.append(f"| {r['phase']} | {r['requests']} | {r['failed']} | {fmt(r['median_s'])} | {fmt(r['p99_s'])} | "
                     f"{r['load']:.1f} |")
    lines += ["", "Server counters afterwards:", "", *[f"    {line}" for line in rejected]]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.out}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    (RESULTS / f"{args.out}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
