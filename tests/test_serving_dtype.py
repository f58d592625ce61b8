"""inference_copy(dtype="auto"): bfloat16 only on CPUs that multiply it natively (AVX512-BF16 or AMX)."""

import keras
import pytest

import vit_keras
from vit_keras.precision import bfloat16_cpu, fast_inference_dtype

# Flag lines as Linux prints them: an AMD EPYC (Zen 4, AVX512-BF16), an Intel Xeon with AMX, an AVX-512 Xeon
# without bfloat16 (Cascade Lake), an AVX2-only CPU.
FLAGS = {
    "zen4": "fpu sse avx2 avx512f avx512bw avx512_bf16 avx512_vnni",
    "sapphire_rapids": "fpu sse avx2 avx512f avx512_vnni avx512_bf16 amx_bf16 amx_tile amx_int8",
    "cascade_lake": "fpu sse avx2 avx512f avx512bw avx512_vnni",
    "avx2": "fpu sse avx avx2 fma",
}


@pytest.mark.parametrize("cpu,expected", [("zen4", "bfloat16"), ("sapphire_rapids", "bfloat16"),
                                          ("cascade_lake", "float32"), ("avx2", "float32")])
def test_fast_inference_dtype_follows_the_cpu_flags(tmp_path, cpu, expected):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nmodel name\t: test\nflags\t\t: {FLAGS[cpu]}\n\nprocessor\t: 1\n")
    assert fast_inference_dtype(str(cpuinfo)) == expected


def test_no_cpuinfo_means_float32(tmp_path):
    assert bfloat16_cpu(str(tmp_path / "missing")) is False
    assert fast_inference_dtype(str(tmp_path / "missing")) == "float32"


def test_default_copy_has_the_dtype_of_this_cpu():
    """`inference_copy`'s default is "auto": bfloat16 only where this CPU multiplies it natively."""
    model = vit_keras.build_model(32, 16, 1, 32, 2, 64, classes=4)
    copy = vit_keras.inference_copy(model)
    dense = copy.get_layer("Transformer").blocks[0].mlp.dense_1
    assert keras.backend.standardize_dtype(dense.kernel.dtype) == fast_inference_dtype()
