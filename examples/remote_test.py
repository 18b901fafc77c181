"""Check a bundle on a real device over the network against TFLite on this computer (host side).

On the device (a Raspberry Pi, say), serve bundles of this runtime::

    edgeq serve --host 0.0.0.0 --port 9090 --runtime model.edgeq --token SECRET

Here, with the source model beside the bundle (or pass it as MODEL)::

    EDGEQ_RPC_TOKEN=SECRET python examples/remote_test.py model.edgeq pi.local:9090 [PICTURES_DIR] [MODEL]

The device runs the pictures' tensors (and a few random ones); the host's reference
interpreter runs the same tensors; the report says whether they agree and how fast the device
was. Exit status 0 when the device passed. Needs the host extras (pip install 'edgeq[host]').
"""
from __future__ import annotations

import sys

from edgeq.errors import EdgeqError
from edgeq.remote import remote_test


def main(argv: list[str]) -> int:
    if len(argv) not in (2, 3, 4):
        print(__doc__, file=sys.stderr)
        return 2
    bundle, device = argv[0], argv[1]
    pictures = argv[2] if len(argv) > 2 else None
    model = argv[3] if len(argv) > 3 else None
    try:
        report = remote_test(bundle, remote=device, images=pictures, model=model, repeat=10, timeout=120)
    except EdgeqError as error:
        print(f"remote test failed: {error}", file=sys.stderr)
        return 1
    for result in report.devices:
        if result.error:
            print(f"{result.device}: ERROR {result.error}")
            continue
        where = f"{result.device} ({result.info.hostname}, {result.info.arch})" if result.info else result.device
        print(f"{where}: {'PASS' if result.passed else 'FAIL'}  {len(result.pictures)} inputs, "
              f"{100 * result.identical:.1f}% identical, max {result.max_steps:g} steps, "
              f"top-1 agreement {100 * result.top1_agreement:.0f}%")
        if result.latency is not None:
            print(f"    latency p50 {result.latency.p50_ms:.2f} ms, p90 {result.latency.p90_ms:.2f} ms")
    return 0 if report.passed else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
