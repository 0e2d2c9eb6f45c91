"""Seeded fuzzing of every HE frame a peer can send: checksum-valid mutations never crash the reader.

Each backend runs in a child process with its address space capped, so a crash (SIGSEGV, SIGFPE,
an uncaught C++ exception) or a runaway allocation fails this test instead of the suite. The child
mutates real frames (the public context an evaluator receives, the batch it receives, the reply a
key holder receives), recomputes the envelope's checksum, and hands each to the code that reads it
from the network: `Evaluator(...)`, `Evaluator.evaluate_bytes`, `KeyHolder.from_bytes` then
`KeyHolder.decrypt`. Every outcome must be a typed HEError or a well-formed result.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from tests.he.conftest import BACKEND_NAMES

MUTATIONS_PER_FRAME = 200  # × 3 frames per backend
ADDRESS_SPACE = 6 << 30  # bytes; the child needs about 1 GiB at N = 4096

CHILD = textwrap.dedent(
    """
    import json, resource, struct, sys
    import numpy as np
    resource.setrlimit(resource.RLIMIT_AS, ({limit}, {limit}))
    from tensafe.he import wire
    from tensafe.he.backends import build_backend
    from tensafe.he.errors import HEError
    from tensafe.he.lora import Evaluator, KeyHolder
    from tensafe.he.params import preset

    params = preset("n4096")
    backend = build_backend("{backend}", params)
    rng = np.random.default_rng({seed})
    holder = KeyHolder(backend)
    a, b = rng.normal(0, 0.05, (16, 4)), rng.normal(0, 0.05, (4, 8))
    public = holder.public_context()
    evaluator = Evaluator(backend, public, a, b, 2.0)
    upload = holder.to_bytes(holder.encrypt(rng.uniform(-1, 1, (8, 16)), evaluator.input_bound))
    reply = evaluator.evaluate_bytes(upload)
    assert holder.decrypt(holder.from_bytes(reply), 8, 8).shape == (8, 8)
    bid = wire.BackendId.OPENFHE if "{backend}" == "openfhe" else wire.BackendId.KERNELS
    SPECIAL = [0, 1, 2, 255, 1 << 31, (1 << 32) - 1, 1 << 62, 1 << 63, (1 << 64) - 1,
               params.ring_degree, int(params.moduli[0]), int(params.moduli[0]) - 1]

    def payload(frame, kind):
        return bytes(wire.unpack(frame, kind, bid, params, wire.DEFAULT_MAX_BYTES))

    def mutate(p):
        p = bytearray(p)
        # half the mutations hit the first 256 bytes, where counts, levels, tags and seeds live
        where = lambda width=1: int(rng.integers(0, max(1, min(len(p), 256 if rng.random() < 0.5
                                                                  else len(p)) - width)))
        op = int(rng.integers(0, 7))
        if op == 0:
            for _ in range(int(rng.integers(1, 9))):
                i = where(); p[i] ^= 1 << int(rng.integers(0, 8))
        elif op == 1 and len(p) >= 8:
            i = where(8); p[i:i + 8] = struct.pack("<Q", SPECIAL[int(rng.integers(len(SPECIAL)))])
        elif op == 2 and len(p) >= 4:
            i, v = where(4), SPECIAL[int(rng.integers(len(SPECIAL)))]
            p[i:i + 4] = struct.pack("<I", v % (1 << 32))
        elif op == 3:
            del p[int(rng.integers(0, len(p))):]
        elif op == 4:
            p += rng.bytes(int(rng.integers(1, 4096)))
        elif op == 5:
            i = where(); j = min(len(p), i + int(rng.integers(1, 512))); p[i:i] = p[i:j]
        else:
            i = where(); p[i:i + 64] = bytes(64) if rng.random() < 0.5 else b"\\xff" * 64
        return bytes(p)

    def read_public(frame):
        Evaluator(backend, frame, a, b, 2.0)

    def read_upload(frame):
        evaluator.evaluate_bytes(frame)

    def read_reply(frame):
        holder.decrypt(holder.from_bytes(frame), 8, 8)

    counts = {{"typed": 0, "accepted": 0}}
    failures = []
    for name, frame, kind, read in [
        ("public", public, wire.Kind.PUBLIC_CONTEXT, read_public),
        ("upload", upload, wire.Kind.CIPHERTEXT_BATCH, read_upload),
        ("reply", reply, wire.Kind.CIPHERTEXT_BATCH, read_reply),
    ]:
        original = payload(frame, kind)
        for k in range({mutations}):
            crafted = bytes(wire.pack(kind, bid, params, mutate(original)))
            try:
                read(crafted)
                counts["accepted"] += 1
            except HEError:
                counts["typed"] += 1
            except BaseException as exc:  # noqa: BLE001  (what the test is looking for)
                failures.append(f"{{name}} mutation {{k}}: {{type(exc).__name__}}: {{str(exc)[:200]}}")
    print(json.dumps({{"counts": counts, "failures": failures}}))
    """
)


@pytest.mark.parametrize("backend", BACKEND_NAMES)
def test_crafted_frames_are_typed_errors_and_the_process_survives(backend, tmp_path):
    script = CHILD.format(backend=backend, seed=20261201, mutations=MUTATIONS_PER_FRAME, limit=ADDRESS_SPACE)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, (
        f"the {backend} reader died (return code {done.returncode}: a negative code is the signal)\n"
        f"{done.stderr[-3000:]}"
    )
    report = json.loads(done.stdout.strip().splitlines()[-1])
    print(backend, report["counts"])
    assert report["failures"] == [], "\n".join(report["failures"][:20])
    counts = report["counts"]
    assert counts["typed"] + counts["accepted"] == 3 * MUTATIONS_PER_FRAME
    assert counts["typed"] >= MUTATIONS_PER_FRAME  # most mutations break the layout; residue flips may not
