"""benchmarks/bench_gpu.py at toy scale on the CPU: the real-scale check's own code, tiny models."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_gpu.py"


def _bench(tmp_path, *args):
    return subprocess.run([sys.executable, str(SCRIPT), "--toy", "--out", str(tmp_path), *args],
                          capture_output=True, text=True, timeout=600)


def test_toy_run_measures_every_stage_with_fp8_weights_and_the_speed_variants(tmp_path):
    jobs = "plan:wan2.2-5b:gpu,anchor:wan2.2-5b:gpu:fp8,animate:wan2.2-a14b:gpu:fp8,speed:wan2.1-1.3b:gpu"
    proc = _bench(tmp_path, "--only", jobs, "--steps", "3")
    assert proc.returncode == 0, proc.stderr[-2000:]
    records = [json.loads(line) for line in (tmp_path / "bench_gpu.jsonl").read_text().splitlines()]
    assert [(r["stage"], r["weights"]) for r in records] == [
        ("plan", "native"), ("anchor", "fp8"), ("animate", "fp8"), ("speed", "native")]
    assert not any("error" in r for r in records), records
    plan, anchor, animate, speed = records
    assert plan["generate_32_tokens_s"] > 0
    assert anchor["fp8_components"] == ["transformer"] and anchor["output_shape"][1] == 3  # decoded RGB
    assert animate["fp8_components"] == ["transformer"] and animate["decoded"] and animate["s_per_step"] > 0
    variants = {v["variant"]: v for v in speed["variants"]}
    assert set(variants) == {"native", "_native_math", "compile (eager)"}
    assert variants["native"]["max_abs_diff"] == 0
    # another kernel rounds differently; compiling (eager) runs the same kernels
    assert 0 <= variants["_native_math"]["max_abs_diff"] < 1e-4
    assert variants["compile (eager)"]["max_abs_diff"] == 0
    table = (tmp_path / "bench_gpu.md").read_text()
    assert "| anchor | wan2.2-5b | gpu | fp8 |" in table and "compile (eager):" in table


@pytest.mark.parametrize("weights", ["gguf-q8_0", "torchao-int8wo"])
def test_toy_run_loads_quantized_weights_back_through_the_family_loader(tmp_path, weights):
    pytest.importorskip({"gguf-q8_0": "gguf", "torchao-int8wo": "torchao"}[weights],
                        reason="the optional quant extra: pip install 'fvg[quant]'")
    proc = _bench(tmp_path, "--only", f"animate:wan2.1-1.3b:gpu:{weights},animate:wan2.1-1.3b:gpu", "--steps", "2")
    assert proc.returncode == 0, proc.stderr[-2000:]
    quantized, native = [json.loads(line) for line in (tmp_path / "bench_gpu.jsonl").read_text().splitlines()]
    assert "error" not in quantized and quantized["weights"] == weights and quantized["save_and_load_s"] >= 0
    assert quantized["decoded"] and quantized["output_shape"] == native["output_shape"]
    if weights == "gguf-q8_0":
        assert quantized["gguf_q8_0_tensors"] > 0


@pytest.mark.parametrize("job", ["animate:wan2.2-5b:gpu:int4", "render:wan2.2-5b:gpu", "animate:wan2.2-5b:fast",
                                 "animate:cogvideox1.5-5b:gpu:gguf-q8_0", "anchor:wan2.2-5b:gpu:torchao-int8wo",
                                 "animate:wan2.1-1.3b:group-offload:bnb-4bit"])
def test_a_bad_job_is_refused_in_one_line(tmp_path, job):
    proc = _bench(tmp_path, "--only", job)
    assert proc.returncode == 2 and f"bad job '{job}'" in proc.stderr.splitlines()[-1]
    assert not (tmp_path / "bench_gpu.jsonl").exists()
