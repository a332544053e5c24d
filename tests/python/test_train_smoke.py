#!/usr/bin/env python3
"""examples/python/train_smoke.py as a test (shortened: 8 steps per phase):
4 torch.multiprocessing workers train through one CPU nsad while the flag
flips v2 -> v1 -> v2; the example checks pickup per worker, falling loss, no
failed request and metrics on both paths; here we check its summary too.
Skipped (exit 77) without torch."""
import json
import os
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import nsadtest  # noqa: E402

try:
    import torch  # noqa: F401
except ImportError as e:
    nsadtest.skip_suite("torch not importable (%s); apt-get install python3-torch" % e)


def test_train_smoke(d):
    example = os.path.join(nsadtest.REPO, "examples", "python", "train_smoke.py")
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "summary.json")
        r = subprocess.run([sys.executable, example, "--socket", d.sock, "--nsactl",
                            nsadtest.binary("nsactl"), "--device", "cpu", "--workers", "4",
                            "--phase-steps", "8", "--timeout", "240", "--json", out],
                           capture_output=True, text=True, timeout=280)
        print(r.stdout[-4000:])
        assert r.returncode == 0, "train_smoke failed (%d):\n%s\n%s" % (r.returncode,
                                                                      r.stdout[-4000:],
                                                                      r.stderr[-4000:])
        with open(out) as f:
            s = json.load(f)
    assert s["ok"] and s["errors"] == 0 and s["nsad_error_replies"] == 0, s
    assert [f["path"] for f in s["flips"]] == ["varlen_v1", "varlen_v2"], s["flips"]
    assert len(s["pickups"]) == 4
    for w, picks in s["pickups"].items():
        assert [p["path"] for p in picks] == ["varlen_v1", "varlen_v2"], (w, picks)
    assert s["loss_last"] < 0.8 * s["loss_first"], s
    for key in ("sel_attn.forward/varlen_v1", "sel_attn.forward/varlen_v2",
                "sel_attn.backward/varlen_v1", "sel_attn.backward/varlen_v2"):
        assert s["metrics_delta"].get(key, 0) > 0, (key, s["metrics_delta"])


if __name__ == "__main__":
    sys.exit(nsadtest.main([test_train_smoke]))
