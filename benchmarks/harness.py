"""Shared measuring tools for the benchmarks: timing, peak memory, machine facts, result files."""

from __future__ import annotations

import contextlib
import functools
import http.server
import json
import os
import platform
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

RESULTS_DIR = Path(__file__).resolve().parent / "results"


@dataclass
class Measurement:
    """One benchmark figure: what was measured, its value, the same-run baseline and a target."""

    name: str
    value: float
    unit: str
    baseline_name: str | None = None
    baseline_value: float | None = None
    ratio: float | None = None  # value / baseline_value, oriented so that > 1 means "better"
    target: str | None = None
    met: bool | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def versus(
        cls,
        name: str,
        value: float,
        unit: str,
        baseline_name: str,
        baseline_value: float,
        at_least: float | None,
        of: str = "",
        lower_is_better: bool = False,
        extra: dict[str, Any] | None = None,
    ) -> Measurement:
        """A figure whose target is a ratio to its same-run baseline: met when the ratio (inverted
        for times and memory, so that > 1 still means better) is >= `at_least`; the target reads
        ">= {at_least}x {of}", so the threshold is written once. `at_least=None`: the ratio is
        only reported."""
        if lower_is_better:
            ratio = baseline_value / value if value else None
        else:
            ratio = value / baseline_value if baseline_value else None
        return cls(
            name,
            value,
            unit,
            baseline_name=baseline_name,
            baseline_value=baseline_value,
            ratio=ratio,
            target="report" if at_least is None else f">= {at_least:g}x {of}",
            met=None if at_least is None or ratio is None else bool(ratio >= at_least),
            extra=extra or {},
        )

    @classmethod
    def against_gemm_peak(
        cls,
        name: str,
        value: float,
        unit: str,
        *,
        peak: float,
        flops_per_item: float,
        baseline_name: str,
        target_mfu: float | None,
        extra: dict[str, Any],
    ) -> Measurement:
        """A throughput judged by its MFU: its ratio to the rate the measured GEMM `peak` (FLOP/s)
        would give for `flops_per_item`; the extra records the MFU beside the rest."""
        baseline = peak / flops_per_item
        mfu = value / baseline
        return cls(
            name,
            value,
            unit,
            baseline_name=baseline_name,
            baseline_value=baseline,
            ratio=mfu,
            target=f"MFU >= {target_mfu}" if target_mfu else None,
            met=bool(mfu >= target_mfu) if target_mfu else None,
            extra={**extra, "mfu": mfu},
        )


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    import torch

    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    from lightning_modules.hardware import cpu_capability, cpu_has_native_bf16

    gpu = {"gpu": torch.cuda.get_device_name()} if torch.cuda.is_available() else {}
    return {
        "cpu": cpu,
        "cpu_capability": cpu_capability(),
        "cpu_native_bf16": cpu_has_native_bf16(),
        **gpu,
        "cores": os.cpu_count(),
        "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def best_time(fn: Callable[[], Any], repeats: int = 3, warmup: int = 1) -> float:
    """Best wall-clock seconds of `repeats` calls after `warmup` calls (best-of filters noise)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def run_isolated(code: str, timeout: float = 1800) -> dict[str, Any]:
    """Run `code` in a fresh interpreter; it must print one JSON object on its last line.

    Used for peak-memory figures: the child's own peak resident memory is added as `peak_gb`.
    It is read from VmHWM, not ru_maxrss: Linux carries ru_maxrss across fork + exec, so a child
    of a large benchmark process would report the parent's peak instead of its own.
    """
    wrapper = (
        code
        + "\nimport json as _j, sys as _s\n"
        + "_s.stdout.flush()\n"
        + "_hwm = next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmHWM:'))\n"
        + "print(_j.dumps({'peak_gb': _hwm / 2**20}))\n"
    )
    proc = subprocess.run([sys.executable, "-c", wrapper], capture_output=True, text=True, timeout=timeout, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"isolated benchmark failed:\n{proc.stderr[-4000:]}")
    lines = [ln for ln in proc.stdout.strip().splitlines() if ln.startswith("{")]
    result = json.loads(lines[-2]) if len(lines) >= 2 else {}
    result.update(json.loads(lines[-1]))
    return result


def write_results(bench: str, measurements: list[Measurement]) -> Path:
    """Write benchmarks/results/<bench>.json atomically."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{bench}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(
        json.dumps(
            {"benchmark": bench, "machine": machine(), "measurements": [asdict(m) for m in measurements]},
            indent=2,
        )
    )
    tmp.replace(path)
    return path


def write_table() -> Path:
    """Collect every results/*.json into results/README.md, one markdown table."""
    rows = []
    machines = []
    for path in sorted(RESULTS_DIR.glob("*.json")):
        data = json.loads(path.read_text())
        machines.append(f"- {data['benchmark']}: " + ", ".join(f"{k}={v}" for k, v in data["machine"].items()))
        for m in data["measurements"]:
            ratio = f"{m['ratio']:.2f}x" if m.get("ratio") is not None else ""
            base = f"{m['baseline_value']:.4g} ({m['baseline_name']})" if m.get("baseline_value") is not None else ""
            met = {True: "yes", False: "**no**", None: ""}[m.get("met")]
            rows.append(
                f"| {data['benchmark']} | {m['name']} | {m['value']:.4g} {m['unit']} | {base} | {ratio} "
                f"| {m.get('target') or ''} | {met} |"
            )
    lines = ["# Benchmark results", "", "Machines:", *machines, ""]
    lines += [
        "| benchmark | measurement | value | same-run baseline | ratio | target | met |",
        "|---|---|---|---|---|---|---|",
        *rows,
        "",
    ]
    out = RESULTS_DIR / "README.md"
    out.write_text("\n".join(lines))
    return out


class SendfileHandler(http.server.SimpleHTTPRequestHandler):
    """http.server's file handler with the body sent by the kernel (sendfile), not copied in Python."""

    def copyfile(self, source, outputfile) -> None:
        outputfile.flush()
        self.connection.sendfile(source)

    def log_message(self, *args) -> None:
        pass


def serve(root: str, port: int) -> None:
    """The loader benchmark's HTTP server process (bench_loader.http_server starts it)."""
    handler = functools.partial(SendfileHandler, directory=root)
    http.server.ThreadingHTTPServer(("127.0.0.1", port), handler).serve_forever()


def wait_for_port(port: int, process: subprocess.Popen, seconds: float = 30) -> None:
    """Return once `process` (a server started on 127.0.0.1:`port`) accepts connections; RuntimeError
    (the process killed) if it exits or has not started within `seconds`."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline or process.poll() is not None:
                process.kill()
                raise RuntimeError(f"{process.args[0]} did not start on port {port}") from None
            time.sleep(0.1)


@contextlib.contextmanager
def serve_directory(root: Path, handler: type = http.server.SimpleHTTPRequestHandler) -> Iterator[str]:
    """`root` over HTTP on 127.0.0.1 (a free port, a background thread): yields the base URL.

    Used by the remote-shard tests (the loader benchmark serves with sendfile instead).
    """
    quiet = type("Quiet", (handler,), {"log_message": lambda self, *args: None})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(quiet, directory=str(root)))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
