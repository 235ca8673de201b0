"""The audit writer's cost on the request path: plain hash chain against the keyed chain with checkpoints.

    python benchmarks/bench_audit.py [--records 20000] [--rounds 5]

Each round appends the same gateway-sized predict record N times to a fresh file, once per configuration,
interleaved: `plain` (hash chain, the baseline), `keyed` (--audit-key: an HMAC-SHA256 per line), `keyed_anchored`
(--audit-key + --audit-anchor FILE, checkpoints every 0.5 s: fsync + a signed line elsewhere, off the request path).
Figures: median append latency per configuration (microseconds, median over rounds), p99, and the ratio to plain.
Target: keyed_anchored p50 <= 1.5x plain and <= 100 us. Syslog shipping is not measured here (it reads the file from
its own thread; the request path only sets an event).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import write_result  # noqa: E402
from serving.gateway.audit import AuditTrail  # noqa: E402

RECORD = {"event": "predict", "door": "grpc", "identity": "CN=radiology-viewer,O=Example Hospital", "via": "mtls",
          "client": "10.0.0.17", "model": "brain_mri", "version": 1796676605, "signature": "serving_default",
          "request_id": "c0ffee0123456789abcdef01", "images": 1, "classes": ["glioma"], "confidences": [0.934211],
          "latency_ms": 12.5, "outcome": "OK"}


def one_round(folder: Path, name: str, records: int, key: Path) -> list[float]:
    options = {"plain": {}, "keyed": {"key_file": str(key)},
               "keyed_anchored": {"key_file": str(key), "anchor": str(folder / f"{name}.anchor"),
                                  "checkpoint_seconds": 0.5}}[name]
    trail = AuditTrail(folder / f"{name}.jsonl", **options)
    latencies = []
    for _ in range(records):
        start = time.perf_counter()
        trail.append(RECORD)
        latencies.append(time.perf_counter() - start)
    trail.close()
    (folder / f"{name}.jsonl").unlink()
    return latencies


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    names = ("plain", "keyed", "keyed_anchored")
    p50: dict[str, list[float]] = {name: [] for name in names}
    p99: dict[str, list[float]] = {name: [] for name in names}
    with tempfile.TemporaryDirectory() as work:
        folder = Path(work)
        key = folder / "audit.key"
        key.write_bytes(os.urandom(32).hex().encode())
        key.chmod(0o600)
        for _ in range(args.rounds):
            for name in names:
                latencies = sorted(one_round(folder, name, args.records, key))
                p50[name].append(latencies[len(latencies) // 2] * 1e6)
                p99[name].append(latencies[int(len(latencies) * 0.99)] * 1e6)
    figures = {"records_per_round": args.records, "rounds": args.rounds}
    for name in names:
        figures[f"{name}_p50_us"] = round(statistics.median(p50[name]), 1)
        figures[f"{name}_p99_us"] = round(statistics.median(p99[name]), 1)
    figures["keyed_anchored_over_plain_p50"] = round(figures["keyed_anchored_p50_us"] / figures["plain_p50_us"], 2)
    targets = {"ratio": "keyed_anchored p50 <= 1.5x plain", "absolute": "keyed_anchored p50 <= 100 us"}
    passed = {"ratio": figures["keyed_anchored_over_plain_p50"] <= 1.5,
              "absolute": figures["keyed_anchored_p50_us"] <= 100}
    write_result("audit", f"benchmarks/bench_audit.py --records {args.records} --rounds {args.rounds}", figures,
                 targets, passed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
