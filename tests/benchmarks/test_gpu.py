"""`python -m benchmarks.gpu`, the parts a CPU can run: arguments, the report writer, and --dry-run.

The dry run runs every section at tiny shapes on the CPU (the kernels interpreted, PyTorch on CPU) in
child processes, as the GPU run does; this test process itself imports neither torch nor the sections.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import gpu

ROOT = Path(__file__).resolve().parents[2]


def test_arguments() -> None:
    args = gpu.parse_args([])
    assert (args.dry_run, args.only, args.budget_s) == (False, gpu.SECTIONS, 480.0)
    args = gpu.parse_args(["--dry-run", "--only", "train, bnb_quant", "--budget-s", "60", "--out", "x"])
    assert (args.dry_run, args.only, args.budget_s, args.out) == (True, ("train", "bnb_quant"), 60.0, Path("x"))


@pytest.mark.parametrize("only", ["kernels", "", "train,nope"])
def test_unknown_sections_are_rejected_by_name(only, capsys) -> None:
    with pytest.raises(SystemExit):
        gpu.parse_args(["--only", only])
    assert "choose from exactness,bandwidth,bnb_quant,train" in capsys.readouterr().err


def test_the_full_plan_fits_the_gpu_budget() -> None:
    # The per-section limits must leave the 480 s budget under `timeout 540` (start-up and the report).
    assert sum(gpu.LIMITS.values()) <= 500 and set(gpu.LIMITS) == set(gpu.SECTIONS)
    plan = gpu.specs(dry_run=False)
    assert plan["bandwidth"]["batches"] == [1, 2, 4, 8, 16]
    assert [4096, 4096] in plan["bandwidth"]["shapes"] and [4096, 11008] in plan["bandwidth"]["shapes"]
    assert set(plan["train"]) == {"1b", "7b-shaped-2-layers"} and plan["train"]["7b-shaped-2-layers"]["memory_analysis"]


def _report(sections: dict) -> dict:
    return {"date": "2027-01-02T03:04:05", "dry_run": False, "wall_s": 300.0, "sections": sections,
            "machine": {"cpu": "Intel Xeon Platinum", "cpus": 16, "ram": "128 GB"}}


def test_report_writer_names_the_accelerator_and_keeps_errors(tmp_path) -> None:
    device = {"platform": "gpu", "device_kind": "NVIDIA H200", "jax": "0.11.0"}
    report = _report({
        "exactness": {"error": "rc 1: Triton compilation failed: boom"},
        "bandwidth": {"copy_gb_s": 4100.0, "copy_bytes": 2**30, "device": device,
                      "rows": [{"shape": "4096x4096", "batch": 1, "path": "kernel", "us": 3.0, "gb_s": 2900.0,
                                "fraction_of_copy": 0.71},
                               {"shape": "4096x4096", "batch": 1, "path": "kernel bn64 bk512", "error": "ValueError"}]},
        "train": {"1b": {"spec": {"model": {"hidden_size": 2048}, "batch": 4, "seq": 512},
                         "jax": {"train_tokens_per_s": 9000.0, "train_device_peak_bytes": 3 * 2**30,
                                 "compiled_argument_size": 2**30, "compiled_output_size": 2**30,
                                 "compiled_alias_size": 2**30, "compiled_temp_size": 2**29, "use_kernel": True},
                         "torch": {"train_tokens_per_s": 6000.0, "device_peak_bytes": 4 * 2**30, "quantized": False}}},
        "bnb_quant": {"skipped": "bitsandbytes is not installed"},
    })
    paths = gpu.write_report(report, tmp_path)
    assert Path(paths["json"]).name == "2027-01-02_nvidia-h200_gpu.json"
    assert json.loads(Path(paths["json"]).read_text())["sections"]["exactness"]["error"].endswith("boom")
    md = Path(paths["md"]).read_text()
    assert "ERROR: `rc 1: Triton compilation failed: boom`" in md
    assert "| 4096x4096 | 1 | kernel | 3 | 2.9e+03 | 0.71 |" in md
    assert "| train tokens/s | 9e+03 | 6e+03 | 1.5 |" in md
    assert "PEFT LoRA over bf16 (bitsandbytes absent)" in md
    assert "temp 0.5 GiB: total 1.5 GiB vs real peak 3 GiB" in md  # args + outputs + temp - aliased
    assert "skipped: bitsandbytes is not installed" in md


def test_report_on_a_cpu_names_the_cpu(tmp_path) -> None:
    paths = gpu.write_report(_report({}) | {"dry_run": True}, tmp_path)
    assert Path(paths["md"]).name == "2027-01-02_intel-xeon-platinum-cpu_gpu-dry-run.md"


def test_dry_run_runs_every_section_on_cpu(tmp_path) -> None:
    proc = subprocess.run([sys.executable, "-m", "benchmarks.gpu", "--dry-run", "--out", str(tmp_path)],
                          capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "section train" in proc.stderr  # progress is printed as it goes
    (path,) = tmp_path.glob("*_gpu-dry-run.json")
    report = json.loads(path.read_text())
    sections = report["sections"]
    assert set(sections) == set(gpu.SECTIONS)
    errors = {name: s["error"] for name, s in sections.items() if "error" in s}
    errors |= {f"train/{m}/{side}": r[side]["error"] for m, r in sections["train"].items() if isinstance(r, dict)
               for side in ("jax", "torch") if "error" in r.get(side, {})}
    assert not errors, errors
    assert sections["exactness"]["all_within_bounds"] is True
    tiny = sections["train"]["tiny"]
    # Same checkpoint and batches: the first step's loss (LoRA B = 0: the base model's) agrees.
    assert abs(tiny["jax"]["first_loss"] - tiny["torch"]["first_loss"]) < 0.05
    assert tiny["jax"]["compiled_temp_size"] > 0
    assert (tmp_path / path.name.replace(".json", ".md")).read_text().startswith("# jaxlora GPU benchmark (DRY RUN")
