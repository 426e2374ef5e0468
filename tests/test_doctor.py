"""`facert doctor` on this machine's providers (CPU here; CUDA/TensorRT where installed)."""

from __future__ import annotations

import pytest

from facert.bench import doctor
from facert.cli import main


def test_doctor_checks_every_cpu_precision_and_passes(tiny_model_dir):
    reference, checks = doctor.run(tiny_model_dir)
    assert reference == "torch"  # torch is installed in the test environment: exact reference
    assert [(c.provider, c.precision) for c in checks][:3] == [
        ("CPUExecutionProvider", p) for p in ("fp32", "int8", "int4")
    ]
    cpu_fp32 = checks[0]
    assert cpu_fp32.top1 == 1.0 and cpu_fp32.rel_error < 1e-4 and cpu_fp32.decode_ms > 0
    assert all(c.passed for c in checks), doctor.table(checks)


def test_a_broken_provider_fails_without_hiding_the_others(tiny_model_dir, monkeypatch):
    monkeypatch.setattr(
        doctor,
        "plan",
        lambda: [("CPUExecutionProvider", "fp32"), ("NoSuchExecutionProvider", "fp16")],
    )
    _, checks = doctor.run(tiny_model_dir)
    assert checks[0].passed and not checks[1].passed
    assert "not available" in checks[1].error
    assert "FAIL" in doctor.table(checks).splitlines()[-1]


def test_doctor_cli_exit_status(tiny_model_dir, monkeypatch, capsys):
    assert main(["doctor", "-m", str(tiny_model_dir)]) == 0
    assert "PASS" in capsys.readouterr().out
    monkeypatch.setattr(doctor, "MIN_TOP1", {**doctor.MIN_TOP1, "int4": 1.01})  # cannot be met
    assert main(["doctor", "-m", str(tiny_model_dir)]) == 2


def test_doctor_says_plainly_when_there_is_no_cuda_gpu(tiny_model_dir, monkeypatch, capsys):
    available, why = doctor.cuda_status()
    if available:
        pytest.skip("this machine has a CUDA GPU")
    assert "no CUDA GPU" in why or "PyTorch is not installed" in why
    monkeypatch.setattr(doctor, "run", lambda model_dir, progress=None: ("torch", []))
    assert main(["doctor", "-m", str(tiny_model_dir)]) == 0  # the CPU checks still decide
    assert f"cuda         not checked: {why}" in capsys.readouterr().out
    assert main(["doctor", "-m", str(tiny_model_dir), "--only", "cuda"]) == 2
    assert f"doctor --only cuda cannot run here: {why}" in capsys.readouterr().err


def test_doctor_says_plainly_when_tensorrt_cannot_run(tiny_model_dir, monkeypatch, capsys):
    available, why = doctor.tensorrt_status()
    if available:
        pytest.skip("this machine has TensorRT and a GPU")
    assert "TensorRT engines need" in why or "GPU" in why or "CUDA device" in why
    assert main(["doctor", "-m", str(tiny_model_dir), "--only", "tensorrt"]) == 2
    captured = capsys.readouterr()
    assert f"doctor --only tensorrt cannot run here: {why}" in captured.err
    assert "CPUExecutionProvider" not in captured.out  # --only: no CPU checks


def test_cuda_checks_on_the_cpu_build_of_the_cuda_backend(tiny_model_dir, monkeypatch):
    """run_device's own logic (parity, seeded draws, timings, floor) with the CUDA backend's
    code on the CPU: on a GPU the same function runs the real device."""
    import facert.runtime.model as model_module
    from facert.runtime.backends.cuda_backend import CudaBackend
    from facert.runtime.config import LM_FILE, VQGAN_FILE, read_model

    real_model = doctor.FaceModel

    def face_model(model_dir, backend="onnxruntime", precision="fp32", **options):
        def on_the_cpu(name, path, config, **_):
            files = read_model(path, keep=(LM_FILE, VQGAN_FILE))
            return CudaBackend(files, config, precision, device="cpu")

        with monkeypatch.context() as mp:
            if backend == "cuda":
                mp.setattr(model_module, "create_backend", on_the_cpu)
            return real_model(model_dir, backend=backend, precision=precision, **options)

    monkeypatch.setattr(doctor, "FaceModel", face_model)
    monkeypatch.setattr(doctor, "device_bandwidth", lambda: 1e10)
    checks = doctor.run_device(tiny_model_dir, "cuda", ["fp32", "bf16"])
    assert [(c.backend, c.precision) for c in checks] == [("cuda", "fp32"), ("cuda", "bf16")]
    fp32 = checks[0]
    assert fp32.greedy_equal and fp32.samples_equal == 1.0 and fp32.rel_error < 1e-4, fp32
    assert fp32.lm_path == "eager, torch kernels" and sorted(fp32.step_ms) == [1, 16]
    assert fp32.floor_ms > 0 and fp32.face_s > 0 and fp32.face_codes > 0
    assert all(c.passed for c in checks), doctor.device_table(checks)
