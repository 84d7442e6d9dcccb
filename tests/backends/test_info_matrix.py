"""`paged info`: every backend with its availability and reason, `--device` errors, and the matrix."""

from __future__ import annotations

import json

from paged.backends.common.matrix import FEATURES
from paged.backends.tpu.runtime import ALLOW_CPU_ENV
from paged.cli.main import main

BUILT_IN = ("cuda", "rocm", "tpu", "gaudi", "cpu")


def test_info_lists_every_backend_and_picks_the_first_available(capsys, monkeypatch):
    """On a machine without accelerators (CI) that is cpu; on a GPU machine, the GPU's backend."""
    from paged.backends.registry import choose, discover

    monkeypatch.delenv(ALLOW_CPU_ENV, raising=False)
    assert main(["info"]) == 0
    lines = capsys.readouterr().out.splitlines()
    chosen = next(i for i, line in enumerate(lines) if line.startswith("chosen: "))
    rows = {line.split()[0]: line for line in lines[1:chosen] if line.strip()}
    assert set(BUILT_IN) <= set(rows)
    for reg in discover():
        facts = reg.facts()
        assert rows[reg.name].split()[1] == ("yes" if facts.available else "no") and facts.reason in rows[reg.name]
    assert rows["cpu"].split()[1] == "yes"
    assert "habana_frameworks is not installed" in rows["gaudi"]
    assert lines[chosen] == f"chosen: {choose(discover()).name}"
    if not any(r.facts().available for r in discover() if r.name != "cpu"):
        assert lines[chosen] == "chosen: cpu"
        assert any(line.strip().startswith("dtype auto: ") for line in lines[chosen:])


def test_unavailable_device_is_a_one_line_error(capsys):
    assert main(["generate", "hi", "--device", "rocm"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("paged: error: device 'rocm' is not available here: ")


def test_matrix_marks_what_a_report_verified(tmp_path, capsys):
    report = tmp_path / "report.json"
    report.write_text(json.dumps({"where": "Test rig", "date": "2026-01-02", "backends": {
        "cpu": {"features": {"attention": "passed", "graphs": "skipped", "dtypes": "passed", "fp8": "skipped",
                             "tensor parallel": "failed"}, "dtypes": ["float32"], "note": "host"}}}))
    out = tmp_path / "COMPAT.md"
    assert main(["info", "--matrix", "--merge", str(report), "--write", str(out)]) == 0
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and "backend" not in line}
    assert set(BUILT_IN) <= set(rows)
    cpu = rows["cpu"]
    assert cpu[0] == "yes ✓" and cpu[1] == "no" and cpu[2] == "bfloat16, float32 (✓ float32)"
    assert cpu[FEATURES.index("tensor parallel")] == "gloo ✗" and cpu[-1].endswith("; Test rig (2026-01-02)")
    assert cpu[FEATURES.index("quantization")] == "gguf, awq, gptq, compressed-tensors, fp8"
    assert cpu[FEATURES.index("kv cache")] == "auto, fp8" and rows["rocm"][FEATURES.index("kv cache")] == "auto"
    assert rows["gaudi"][-1] == "not yet on hardware"
    assert out.read_text().startswith("# Compatibility") and "cpu on Test rig: host" in out.read_text()


def test_the_installed_matrix_is_the_repositorys(capsys):
    """`paged info --matrix` reads the reports shipped in the package: it prints COMPATIBILITY.md's table."""
    from pathlib import Path

    assert main(["info", "--matrix"]) == 0
    printed = capsys.readouterr().out
    assert "✓" in printed
    assert printed in (Path(__file__).parents[2] / "COMPATIBILITY.md").read_text()


def test_matrix_rejects_a_file_that_is_not_a_report(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    assert main(["info", "--matrix", "--merge", str(bad)]) == 2
    assert "is not a conformance report" in capsys.readouterr().err
