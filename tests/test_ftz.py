"""Correct under the GPU's real compile flags, with NVIDIA's device headers.

CuPy appends -ftz=true to every NVRTC compile, so float32 denormals flush to zero in
the kernels' arithmetic. These tests check that:

* the emulator flushes float32 denormals like the GPU by default, and keeps them with
  RNNKERNELS_EMULATOR_DENORMALS=keep;
* the emulator catches an FTZ-sensitive conversion (the old hand-written binary16 ->
  float of csrc/common.cuh, planted in tests/emulator_kernels/ftz_conversions.cu), and
  the conversions csrc/ uses now are exact on all 65536 binary16 patterns under FTZ;
* a kernel fed float16 subnormals (the fused gradient norm) is right under FTZ;
* the options the NVRTC check compiles with are exactly CuPy's (recorded from CuPy's
  code), -ftz=true included, and CuPy's additions are the ones pinned here;
* NVIDIA's header folders are found in the documented order, with a clear error naming
  the pip packages when there are none, and the emulator never uses them.
"""

from pathlib import Path

import numpy as np
import pytest
from conftest import cupy_or_skip, emulator_or_skip

from rnnkernels import _launch, _sources, nvrtc_check
from rnnkernels import emulator as emu

KERNELS = Path(__file__).resolve().parent / "emulator_kernels"
DENORMALS = emu.DENORMALS_ENVIRONMENT_VARIABLE  # read by runtime.cpp
ALL_PATTERNS = np.arange(65536, dtype=np.uint32).astype(np.uint16)
SUBNORMAL = ((ALL_PATTERNS & 0x7C00) == 0) & ((ALL_PATTERNS & 0x03FF) != 0)


@pytest.fixture(scope="module")
def conversions():
    emulator_or_skip()
    return emu.load_module(
        [KERNELS / "ftz_conversions.cu"],
        ["planted_half_to_float", "storage_conversions", "denormal_arithmetic"],
        include_dirs=[_sources.csrc_dir()],
    )


def _launch_1d(kernel, n, args):
    kernel(((n + 255) // 256, 1, 1), (256, 1, 1), (*args, np.int32(n)))


# ------------------------------------------------------------------ emulator FTZ mode
def test_emulator_flushes_float32_denormals_by_default(conversions, monkeypatch):
    kernel = conversions.get_function("denormal_arithmetic")
    a = np.array([2.0**-100, 2.0**-130], np.float32)
    b = np.array([2.0**-30, 1.0], np.float32)
    exact = (a.astype(np.float64) * b).astype(np.float32)
    assert (exact != 0).all() and (np.abs(exact) < np.finfo(np.float32).tiny).all()  # denormals

    monkeypatch.delenv(DENORMALS, raising=False)
    product = np.full(2, np.nan, np.float32)
    kernel(1, 32, (a, b, product, np.int32(2)))
    np.testing.assert_array_equal(product, [0.0, 0.0])

    monkeypatch.setenv(DENORMALS, "flush")
    product[:] = np.nan
    kernel(1, 32, (a, b, product, np.int32(2)))
    np.testing.assert_array_equal(product, [0.0, 0.0])

    monkeypatch.setenv(DENORMALS, "keep")
    product[:] = np.nan
    kernel(1, 32, (a, b, product, np.int32(2)))
    np.testing.assert_array_equal(product, exact)


def test_emulator_restores_the_callers_float_mode(conversions, monkeypatch):
    monkeypatch.delenv(DENORMALS, raising=False)
    conversions.get_function("denormal_arithmetic")(
        1, 32, (np.ones(2, np.float32), np.ones(2, np.float32), np.zeros(2, np.float32), np.int32(2))
    )
    # Back in Python (this thread's MXCSR), denormals work again.
    tiny = np.array([2.0**-100], np.float32) * np.float32(2.0**-30)
    assert tiny[0] == np.float32(2.0**-130)


def test_unknown_denormal_mode_is_refused(conversions, monkeypatch):
    monkeypatch.setenv(DENORMALS, "sometimes")
    with pytest.raises(emu.EmulatorError, match="RNNKERNELS_EMULATOR_DENORMALS=sometimes"):
        conversions.get_function("denormal_arithmetic")(
            1, 32, (np.ones(2, np.float32), np.ones(2, np.float32), np.zeros(2, np.float32), np.int32(2))
        )


# ------------------------------------------------------------- binary16 conversions
def test_emulator_catches_the_planted_ftz_sensitive_conversion(conversions, monkeypatch):
    kernel = conversions.get_function("planted_half_to_float")
    expected = ALL_PATTERNS.view(np.float16).astype(np.float32)
    nan = np.isnan(expected)
    assert SUBNORMAL.sum() == 2046

    monkeypatch.setenv(DENORMALS, "keep")  # IEEE denormals: the old code was exact
    out = np.full(65536, np.nan, np.float32)
    _launch_1d(kernel, 65536, (ALL_PATTERNS, out))
    np.testing.assert_array_equal(out.view(np.uint32)[~nan], expected.view(np.uint32)[~nan])

    monkeypatch.delenv(DENORMALS)  # the default, as the GPU under -ftz=true
    out[:] = np.nan
    _launch_1d(kernel, 65536, (ALL_PATTERNS, out))
    wrong = out.view(np.uint32) != expected.view(np.uint32)
    # Every subnormal becomes ±0 (sign kept), everything else stays exact.
    np.testing.assert_array_equal(wrong & ~nan, SUBNORMAL)
    assert (out[SUBNORMAL] == 0).all()
    np.testing.assert_array_equal(np.signbit(out[SUBNORMAL]), np.signbit(expected[SUBNORMAL]))


def _narrowing_inputs() -> np.ndarray:
    """Floats around every binary16 boundary: all subnormal and normal steps, their
    midpoints (ties) and a hair either side, overflow, float32 denormals, NaN."""
    values = ALL_PATTERNS.view(np.float16).astype(np.float64)
    values = values[np.isfinite(values)]
    steps = np.sort(values[values >= 0])
    midpoints = (steps[:-1] + steps[1:]) / 2
    positive = np.concatenate([
        steps, midpoints, midpoints * (1 + 2.0**-20), midpoints * (1 - 2.0**-20),
        [65504.0, 65519.0, 65520.0, 1e6, 3e38, 2.0**-25, 2.0**-26, 2.0**-126, 2.0**-130, 2.0**-149],
    ])
    x = np.concatenate([positive, -positive, [np.inf, -np.inf]]).astype(np.float32)
    return x


@pytest.mark.parametrize("mode", ["flush", "keep"])
def test_csrc_conversions_are_exact_on_every_half_pattern(conversions, monkeypatch, mode):
    monkeypatch.setenv(DENORMALS, mode)
    kernel = conversions.get_function("storage_conversions")
    x = _narrowing_inputs()
    n = max(65536, x.size)
    values = np.resize(ALL_PATTERNS, n)
    x = np.resize(x, n)
    widened = np.full(n, np.nan, np.float32)
    round_trip = np.zeros(n, np.uint16)
    narrowed = np.zeros(n, np.uint16)
    _launch_1d(kernel, n, (values, widened, round_trip, x, narrowed))

    expected = values.view(np.float16).astype(np.float32)
    nan = np.isnan(expected)
    np.testing.assert_array_equal(widened.view(np.uint32)[~nan], expected.view(np.uint32)[~nan])
    assert np.isnan(widened[nan]).all()
    np.testing.assert_array_equal(round_trip[~nan], values[~nan])
    assert np.isnan(round_trip[nan].view(np.float16)).all()
    with np.errstate(over="ignore"):  # beyond 65520 rounds to Inf, on purpose
        np.testing.assert_array_equal(narrowed, x.astype(np.float16).view(np.uint16))


@pytest.mark.parametrize("mode", ["flush", "keep"])
def test_emulated_conversions_keep_float_denormals_like_the_gpus_cvt(monkeypatch, mode):
    """cuda_fp16.h / cuda_bf16.h convert with cvt instructions in inline PTX, which
    -ftz=true does not flush: a float32 denormal keeps its bfloat16 value (binary16 has
    no value that small: ±0). The emulator's stand-ins must agree in both modes."""
    emulator_or_skip()
    monkeypatch.setenv(DENORMALS, mode)
    module = emu.load_module([KERNELS / "low_precision.cu"], ["convert", "arithmetic"])
    rng = np.random.default_rng(3)
    bits = np.concatenate([[1, 0x7FFFFF, 0x400000, 0x8000, 0x7FFF, 0x8001, 0x18000, 0x28000],
                           rng.integers(1, 0x800000, 500)]).astype(np.uint32)
    bits = np.concatenate([bits, bits | 0x80000000])  # and the negatives
    x = bits.view(np.float32)
    n = x.size
    half_bits, bf16_bits = np.zeros(n, np.uint16), np.zeros(n, np.uint16)
    half_back, bf16_back = np.zeros(n, np.float32), np.zeros(n, np.float32)
    module.get_function("convert")((n + 63) // 64, 64, (x, half_bits, half_back, bf16_bits, bf16_back, np.int32(n)))
    np.testing.assert_array_equal(half_bits, (bits >> 16).astype(np.uint16) & 0x8000)  # ±0
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16  # round to nearest even, no overflow here
    np.testing.assert_array_equal(bf16_bits, rounded.astype(np.uint16))
    np.testing.assert_array_equal(bf16_back.view(np.uint32), rounded << 16)


def test_grad_norm_of_float16_subnormals_is_exact_under_ftz(monkeypatch):
    from rnnkernels import _grad_norm

    monkeypatch.delenv(DENORMALS, raising=False)
    rt = emulator_or_skip()
    gradient = ALL_PATTERNS[SUBNORMAL].view(np.float16)  # nothing but subnormals
    out = np.zeros(1, np.float64)
    _grad_norm.sum_of_squares(rt, [gradient], out)
    expected = np.sum(gradient.astype(np.float64) ** 2)
    assert expected > 0
    assert out[0] == pytest.approx(expected, rel=1e-13)


# ---------------------------------------------------------------- CuPy's options
def _cupy_compiler_or_skip():
    pytest.importorskip("cupy", reason="CuPy is not installed")
    try:
        nvrtc_check.load_nvrtc()
    except RuntimeError as error:
        pytest.skip(f"NVRTC is not available: {error.__cause__ or error}")


# What CuPy adds to a RawModule's options besides include folders, in its order, for
# sm_90 (CuPy 14.2). A CuPy that adds, drops or changes one fails here: look at the new
# set, rerun the NVRTC check and the emulator tests under it, then update this list
# (and the emulator, if the float mode changes).
CUPY_ADDED_FLAGS = ("--std=c++17", "-ftz=true", "-arch=sm_90", "--device-as-default-execution-space")


def test_check_compiles_with_cupys_exact_options():
    _cupy_compiler_or_skip()
    import cupy

    ours = _launch.compile_options()
    full = nvrtc_check.cupy_nvrtc_options(ours, "sm_90")
    # Ours go through whole, in order.
    positions = [full.index(option) for option in ours]
    assert positions == sorted(positions)
    added = [option for option in full if option not in ours]
    assert tuple(option for option in added if not option.startswith("-I")) == CUPY_ADDED_FLAGS
    # CuPy's include folders are its own headers or NVIDIA's (wheels or a toolkit).
    cupy_dir = str(Path(cupy.__file__).parent)
    for option in added:
        if option.startswith("-I"):
            folder = option[2:]
            assert folder.startswith(cupy_dir) or "nvidia" in folder or "cuda" in folder, option
    assert nvrtc_check.check_options("sm_80") == (*nvrtc_check.cupy_nvrtc_options(ours, "sm_80"), "-Xptxas=-v")
    # Recording left CuPy as it was.
    from cupy.cuda import compiler

    assert compiler._NVRTCProgram.__name__ == "_NVRTCProgram"
    with pytest.raises(ValueError, match="arch"):
        nvrtc_check.cupy_nvrtc_options(ours, "compute_90")


@pytest.mark.gpu
def test_recorded_options_are_what_rawmodule_passes_on_this_gpu(monkeypatch):
    """On a GPU, a real cupy.RawModule (not the compile_with_cache path the recorder
    goes through) hands NVRTC exactly what cupy_nvrtc_options says for this device."""
    cupy = cupy_or_skip()
    from cupy.cuda import compiler

    monkeypatch.setattr(compiler, "_NVRTCProgram", nvrtc_check._RecordingProgram)
    monkeypatch.setattr(compiler, "_preprocess", lambda *args, **kwargs: "")  # its program is not the module's
    monkeypatch.setattr(compiler, "_empty_file_preprocess_cache", {})
    monkeypatch.setenv("CUPY_CACHE_IN_MEMORY", "1")
    ours = _launch.compile_options()
    module = cupy.RawModule(
        code='extern "C" __global__ void rnnkernels_rawmodule_probe() {}\n',
        options=ours,
        name_expressions=("rnnkernels_rawmodule_probe",),
    )
    with pytest.raises(nvrtc_check._Recorded) as recorded:
        module.compile()
    arch = "sm_" + cupy.cuda.Device().compute_capability
    assert recorded.value.options == nvrtc_check.cupy_nvrtc_options(ours, arch)


def test_nvrtc_check_passes_those_options_to_nvrtc(monkeypatch):
    _cupy_compiler_or_skip()
    nvrtc = nvrtc_check.load_nvrtc()
    seen = []
    real = nvrtc.compileProgram

    def recording(program, options):
        seen.append(tuple(options))
        return real(program, options)

    monkeypatch.setattr(nvrtc, "compileProgram", recording)
    reports = nvrtc_check.compile_source(_launch.GRAD_NORM_SOURCE, "sm_90")
    assert seen == [nvrtc_check.check_options("sm_90")]
    assert "-ftz=true" in seen[0]
    assert {r.name for r in reports} == set(_launch.KERNELS[_launch.GRAD_NORM_SOURCE])


def test_nvrtc_check_prints_the_options(monkeypatch, capsys):
    _cupy_compiler_or_skip()
    monkeypatch.setattr(nvrtc_check, "check_all", lambda arches: [])
    assert nvrtc_check.main(["--arch", "sm_90"]) == 0
    printed = capsys.readouterr().out
    assert "-ftz=true" in printed and " ".join(nvrtc_check.check_options("sm_90")) in printed


# ------------------------------------------------------------ NVIDIA's header folders
def _fake_headers(include: Path, libcudacxx: Path | None = None) -> None:
    for name in _sources.DEVICE_HEADERS:
        (include / name).parent.mkdir(parents=True, exist_ok=True)
        (include / name).write_text("// fake\n")
    if libcudacxx is not None:
        for name in _sources.LIBCUDACXX_HEADERS:
            (libcudacxx / name).parent.mkdir(parents=True, exist_ok=True)
            (libcudacxx / name).write_text("// fake\n")


def test_header_search_order(tmp_path):
    wheels = tmp_path / "site" / "nvidia"
    cuda_path, cuda_home, default = tmp_path / "cuda_path", tmp_path / "cuda_home", tmp_path / "usr_local_cuda"

    def find(environ):
        return _sources.find_cuda_include_dirs([wheels], environ, default)

    environ = {"CUDA_PATH": str(cuda_path), "CUDA_HOME": str(cuda_home)}
    # Nothing anywhere: the error names the pip packages and every place searched.
    with pytest.raises(FileNotFoundError) as error:
        find(environ)
    message = str(error.value)
    for package in (*_sources.CUDA_HEADER_PACKAGES["cuda13"], *_sources.CUDA_HEADER_PACKAGES["cuda12"]):
        assert package in message
    for place in (wheels / "cu13" / "include", wheels / "cuda_runtime" / "include", cuda_path, cuda_home, default):
        assert str(place) in message

    # Last resort: /usr/local/cuda (CUDA 12 toolkit layout: libcu++ in include/ itself).
    _fake_headers(default / "include", default / "include")
    assert find(environ) == (default / "include",)
    # $CUDA_HOME before it, $CUDA_PATH before that (CUDA 13 layout: include/cccl).
    _fake_headers(cuda_home / "include", cuda_home / "include" / "cccl")
    assert find(environ) == (cuda_home / "include", cuda_home / "include" / "cccl")
    _fake_headers(cuda_path / "include", cuda_path / "include" / "cccl")
    assert find(environ) == (cuda_path / "include", cuda_path / "include" / "cccl")
    assert find({}) == (default / "include",)  # unset variables are skipped
    # The CUDA 12 wheels before any toolkit.
    _fake_headers(wheels / "cuda_runtime" / "include", wheels / "cuda_cccl" / "include")
    assert find(environ) == (wheels / "cuda_runtime" / "include", wheels / "cuda_cccl" / "include")
    # An incomplete CUDA 13 wheel set (runtime without cccl, as nvrtc + runtime alone)
    # is passed over; the complete one comes first of all.
    _fake_headers(wheels / "cu13" / "include")
    assert find(environ) == (wheels / "cuda_runtime" / "include", wheels / "cuda_cccl" / "include")
    _fake_headers(wheels / "cu13" / "include", wheels / "cu13" / "include" / "cccl")
    assert find(environ) == (wheels / "cu13" / "include", wheels / "cu13" / "include" / "cccl")


def test_runtime_options_carry_the_header_folders():
    try:
        folders = _sources.cuda_include_dirs()
    except FileNotFoundError as error:
        pytest.skip(f"NVIDIA's device headers are not installed: {error}")
    options = _launch.compile_options()
    for folder in folders:
        assert f"--include-path={folder}" in options
        assert (folder / "cuda_fp16.h").is_file() or (folder / "nv" / "target").is_file()


def test_emulator_never_uses_nvidias_headers(monkeypatch):
    from rnnkernels import emulator
    from rnnkernels.emulator import _build

    # Its stand-ins, with the same names, are what `#include <cuda_fp16.h>` finds there.
    assert (Path(_build.__file__).parent / "include" / "cuda_fp16.h").is_file()
    seen = {}
    monkeypatch.setattr(emulator, "load_module", lambda sources, names, **options: seen.update(options))
    _launch._emulator_module.__wrapped__(_launch.FORWARD_SOURCE, "digest", False)
    assert seen["include_dirs"] == (str(_sources.csrc_dir()),)
