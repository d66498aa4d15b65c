"""The Pallas GEMM and fused SwiGLU (interpret mode on CPU) against ``jnp.dot``, their CUDA
lowering, and the ``matmul_impl`` seam in the model: a sharded training step with the kernel
gives the losses of the XLA einsums.

Every element is compared on random normal inputs. bf16/fp16 products are exact in float32, so
with a float32 output the kernel differs from ``jnp.dot(..., preferred_element_type=f32)`` only
by summation order.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm.config import ConfigError, MeshConfig
from pallas_kernels.dispatch import PROJECTIONS, gated_mlp_hidden, projection
from pallas_kernels.table import Call, select
from pallas_kernels.matmul import BLOCK_TABLE, matmul, pick_blocks, swiglu
from sharding.mesh import make_mesh
from sharding.rules import logical_sharding
from tests.conftest import abstract_gpu

DTYPES = [jnp.float32, jnp.bfloat16, jnp.float16]
SMALL = {"block_m": 16, "block_n": 16, "block_k": 16}  # many tiles on tiny shapes
# forward in float32 output: summation order only; rounded outputs and gradients: the dtype's
TOL_F32_OUT = 1e-5
TOL = {jnp.float32: 1e-5, jnp.bfloat16: 1e-2, jnp.float16: 2e-3}


def _rand(seed, shape, dtype):
    return jax.random.normal(jax.random.key(seed), shape, jnp.float32).astype(dtype)


def _close(got, want, tol):
    """Every element within ``tol`` of the largest reference magnitude (and shapes equal)."""
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    assert got.shape == want.shape
    assert np.all(np.isfinite(got))
    np.testing.assert_allclose(got, want, rtol=0, atol=tol * float(np.max(np.abs(want))))


def _ref(a, b):
    return jnp.dot(a, b, preferred_element_type=jnp.float32)


@functools.partial(jax.jit, static_argnames=("blocks",))
def _kernel_f32(a, b, blocks=()):
    return matmul(a, b, out_dtype=jnp.float32, interpret=True, **dict(blocks))


# M = 149: 10 row-blocks of 16, so a full group of GROUP_M = 8 and a ragged one of 2
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(149, 40, 70), (5, 33, 17)], ids=["grouped", "tiny"])
def test_forward_matches_dot(dtype, shape):
    M, N, K = shape
    a, b = _rand(0, (M, K), dtype), _rand(1, (K, N), dtype)
    _close(_kernel_f32(a, b, blocks=tuple(SMALL.items())), _ref(a, b), TOL_F32_OUT)


@pytest.mark.parametrize("dtype", DTYPES)
def test_default_blocks_and_output_dtype(dtype):
    a, b = _rand(2, (24, 50), dtype), _rand(3, (50, 72), dtype)  # one ragged tile from the table
    got = jax.jit(functools.partial(matmul, interpret=True))(a, b)
    assert got.dtype == dtype
    _close(got, _ref(a, b), TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
def test_gradients_match_vjp_of_dot(dtype):
    M, N, K = 37, 45, 70
    a, b, ct = _rand(4, (M, K), dtype), _rand(5, (K, N), dtype), _rand(6, (M, N), dtype)

    @jax.jit
    def grads(a, b, ct):
        kernel = jax.vjp(lambda a, b: matmul(a, b, interpret=True, **SMALL), a, b)[1](ct)
        ref = jax.vjp(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32), a, b)[1](ct.astype(jnp.float32))
        return kernel, ref

    (da, db), (da_ref, db_ref) = grads(a, b, ct)
    assert da.dtype == dtype and db.dtype == dtype
    _close(da, da_ref, TOL[dtype])
    _close(db, db_ref, TOL[dtype])


def _swiglu_ref(x, wg, wu):
    return jax.nn.silu(_ref(x, wg)) * _ref(x, wu)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_swiglu_forward_and_gradients(dtype):
    M, K, F = 37, 40, 50
    x, wg, wu = _rand(7, (M, K), dtype), _rand(8, (K, F), dtype) * 0.3, _rand(9, (K, F), dtype) * 0.3
    ct = _rand(10, (M, F), dtype)

    @jax.jit
    def run(x, wg, wu, ct):
        out, pull = jax.vjp(lambda *w: swiglu(*w, interpret=True, **SMALL), x, wg, wu)
        ref, pull_ref = jax.vjp(_swiglu_ref, x, wg, wu)
        return out, pull(ct), ref, pull_ref(ct.astype(jnp.float32))

    out, grads, ref, grads_ref = run(x, wg, wu, ct)
    assert out.dtype == dtype
    _close(out, ref, TOL[dtype])
    for g, r in zip(grads, grads_ref):
        assert g.dtype == dtype
        _close(g, r, TOL[dtype] * 2)


def test_pick_blocks_reads_the_table():
    assert pick_blocks(8, 4096, 4096, jnp.bfloat16) == BLOCK_TABLE[("skinny", 2)]
    assert pick_blocks(256, 512, 64, jnp.float32) == BLOCK_TABLE[("medium", 4)]
    assert pick_blocks(8192, 8192, 8192, jnp.float16) == BLOCK_TABLE[("large", 2)]


def test_bad_inputs_say_what_is_wrong():
    a = jnp.ones((32, 32), jnp.float32)
    with pytest.raises(ValueError, match="block_m=24 must be a power of two"):
        matmul(a, a, block_m=24, interpret=True)
    with pytest.raises(ValueError, match="one dtype"):
        matmul(a, a.astype(jnp.bfloat16), interpret=True)
    with pytest.raises(ValueError, match="do not chain"):
        matmul(a, jnp.ones((16, 8)), interpret=True)


# --------------------------------------------------------------------------------------------
# CUDA lowering of the real kernels (no GPU needed: the Pallas -> Triton IR step runs here)

_TRITON = "custom_call @__gpu$xla.gpu.triton("


def _lower_cuda(fn, *avals):
    with abstract_gpu():
        return jax.jit(fn).trace(*avals).lower(lowering_platforms=("cuda",)).as_text()


@pytest.mark.parametrize("key", list(BLOCK_TABLE), ids=[f"{r}_{b}B" for r, b in BLOCK_TABLE])
def test_every_table_entry_lowers_to_triton(key):
    blk = BLOCK_TABLE[key]
    dtype = jnp.bfloat16 if key[1] == 2 else jnp.float32
    a, b = jax.ShapeDtypeStruct((300, 200), dtype), jax.ShapeDtypeStruct((200, 100), dtype)  # ragged
    sizes = {"block_m": blk.block_m, "block_n": blk.block_n, "block_k": blk.block_k}
    assert _lower_cuda(lambda a, b: matmul(a, b, **sizes), a, b).count(_TRITON) == 1
    assert _lower_cuda(lambda a, b, c: swiglu(a, b, c, **sizes), a, b, b).count(_TRITON) == 1


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
def test_gradients_lower_to_triton(dtype):
    a, b = jax.ShapeDtypeStruct((64, 96), dtype), jax.ShapeDtypeStruct((96, 80), dtype)
    mm = jax.value_and_grad(lambda a, b: jnp.sum(matmul(a, b).astype(jnp.float32)), (0, 1))
    assert _lower_cuda(mm, a, b).count(_TRITON) == 3  # forward, dA, dB
    sg = jax.value_and_grad(lambda a, b, c: jnp.sum(swiglu(a, b, c).astype(jnp.float32)), (0, 1, 2))
    assert _lower_cuda(sg, a, b, b).count(_TRITON) == 7  # forward, 2 recomputes, 2 x (dX, dW)


# --------------------------------------------------------------------------------------------
# the seam


def test_select_projection_kernel():
    def kernel(impl, platform, capability=None, dtype=jnp.bfloat16, mnk=(256, 512, 512)):
        return select("projection", Call(dtype, mnk=mnk), impl=impl, platform=platform, capability=capability).kernel

    assert kernel("auto", "cpu") == "xla"
    assert kernel("auto", "gpu", "8.0") == "xla"  # cuBLAS through XLA: measured fastest (kernel table's docstring)
    assert kernel("auto", "gpu", "9.0") == "xla"
    assert kernel("pallas", "gpu", "8.0") == "matmul_triton"
    assert kernel("pallas", "gpu", "9.0") == "matmul_mosaic"
    assert kernel("pallas", "gpu", "9.0", jnp.float32) == "matmul_triton"  # Mosaic: bf16/fp16 only
    assert kernel("pallas", "cpu") == "matmul_triton"  # the interpreter
    with pytest.raises(ConfigError, match="matmul_impl 'triton' is not available"):
        kernel("triton", "gpu", "9.0")
    with pytest.raises(ConfigError, match="matmul_impl 'pallas' has no kernel for tpu"):
        kernel("pallas", "tpu")


def test_config_rejects_unknown_matmul_impl():
    from tests.conftest import tiny_config

    with pytest.raises(ConfigError, match=r"'model.matmul_impl' is 'cublas'; choose one of auto, xla, pallas"):
        tiny_config("model.matmul_impl=cublas")


_SHAPES = {  # activation, weight and the weight's parameter names: B=8, T=4, E=12, H=4, D=6, F=20
    "bte,ehd->bthd": ((8, 4, 12), (12, 4, 6), ("embed", "heads", "head_dim")),
    "bthd,hde->bte": ((8, 4, 4, 6), (4, 6, 12), ("heads", "head_dim", "embed")),
    "bte,ef->btf": ((8, 4, 12), (12, 20), ("embed", "mlp")),
    "btf,fe->bte": ((8, 4, 20), (20, 12), ("mlp", "embed")),
}


@pytest.mark.parametrize("equation", list(PROJECTIONS))
def test_projection_on_a_mesh_matches_einsum(equation, devices):
    """Per shard under shard_map (fsdp4 x tensor2): gathered weights, psum for wo / w_down."""
    x_shape, w_shape, w_names = _SHAPES[equation]
    x, w = _rand(11, x_shape, jnp.float32), _rand(12, w_shape, jnp.float32)
    mesh = make_mesh(MeshConfig(data=1, fsdp=4, tensor=2), devices)
    w_sharded = jax.device_put(w, logical_sharding(mesh, w_names))  # stored as the model stores it
    fn = jax.jit(lambda x, w: projection(equation, x, w, impl="pallas"))
    with jax.set_mesh(mesh):
        got = fn(x, w_sharded)
    _close(got, jnp.einsum(equation, x, w, precision="highest"), TOL_F32_OUT)
    _close(projection(equation, x, w, impl="xla"), jnp.einsum(equation, x, w, precision="highest"), TOL_F32_OUT)


def test_gated_mlp_hidden_on_a_mesh_matches_einsums(devices):
    """The fused SwiGLU per shard (fsdp4 x tensor2): weights gathered over fsdp, mlp split."""
    x, wg, wu = _rand(19, (8, 4, 12), jnp.float32), _rand(20, (12, 20), jnp.float32), _rand(21, (12, 20), jnp.float32)
    mesh = make_mesh(MeshConfig(data=1, fsdp=4, tensor=2), devices)
    put = functools.partial(jax.device_put, device=logical_sharding(mesh, ("embed", "mlp")))
    with jax.set_mesh(mesh):
        got = jax.jit(lambda *a: gated_mlp_hidden(*a, impl="pallas"))(x, put(wg), put(wu))
    gate, up = (jnp.einsum("bte,ef->btf", x, w, precision="highest") for w in (wg, wu))
    _close(got, jax.nn.silu(gate) * up, TOL_F32_OUT * 10)
    want = jax.nn.silu(jnp.einsum("bte,ef->btf", x, wg)) * jnp.einsum("bte,ef->btf", x, wu)
    assert jnp.array_equal(gated_mlp_hidden(x, wg, wu, impl="xla"), want)


def test_train_step_with_pallas_projections_matches_xla(devices):
    """The kernel (interpreter on CPU) in every projection of the jitted, sharded training step."""
    from tests.conftest import batches_and_params, tiny_config
    from tests.test_train import MESH_CFG, _losses

    cfg = tiny_config(*MESH_CFG, "model.num_layers=1", "train.batch_size=8")
    windows, params = batches_and_params(cfg, 2)
    mesh = make_mesh(MeshConfig(data=1, fsdp=4, tensor=2), devices)
    xla, _ = _losses(cfg.replace(model=dataclasses.replace(cfg.model, matmul_impl="xla")), windows, params, mesh)
    pallas, _ = _losses(cfg.replace(model=dataclasses.replace(cfg.model, matmul_impl="pallas")), windows, params, mesh)
    assert xla[1] != xla[0]  # the step changed the weights
    np.testing.assert_allclose(pallas, xla, rtol=2e-5)


# --------------------------------------------------------------------------------------------
# the Hopper kernel (Mosaic GPU) in the Mosaic GPU interpreter (its sm_90a compile:
# tests/test_kernel_resources.py)


def _gpu_interpreter():
    params = pytest.importorskip("jax._src.pallas.mosaic_gpu.interpret.params")
    calls = pytest.importorskip("jax._src.pallas.mosaic_gpu.interpret.interpret_pallas_call")
    return params.InterpretGPUParams(detect_races=True), calls


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_mosaic_kernel_in_the_gpu_interpreter(dtype):
    """Several CTAs (64-row and 128-column tiles) and a 5-deep K loop through a 4-slot pipeline."""
    from pallas_kernels.matmul_mosaic import matmul as matmul_hopper, pick_tiles

    interpret, calls = _gpu_interpreter()
    M, N, K = 64, 384, 320
    assert pick_tiles(M, N, K, dtype).tile_m == 64 and pick_tiles(M, N, K, dtype).tile_n == 128
    a, b = _rand(13, (M, K), dtype), _rand(14, (K, N), dtype)
    got = jax.jit(lambda a, b: matmul_hopper(a, b, out_dtype=jnp.float32, interpret=interpret))(a, b)
    _close(got, _ref(a, b), TOL_F32_OUT)
    assert not calls.get_races().races_found


def test_mosaic_gradients_in_the_gpu_interpreter_and_shapes_it_refuses():
    from pallas_kernels.matmul_mosaic import matmul as matmul_hopper

    interpret, _ = _gpu_interpreter()
    a, b, ct = _rand(15, (64, 128), jnp.bfloat16), _rand(16, (128, 64), jnp.bfloat16), _rand(17, (64, 64), jnp.bfloat16)
    da, db = jax.jit(lambda a, b, ct: jax.vjp(lambda a, b: matmul_hopper(a, b, interpret=interpret), a, b)[1](ct))(a, b, ct)
    da_ref, db_ref = jax.vjp(_ref, a, b)[1](ct.astype(jnp.float32))
    _close(da, da_ref, TOL[jnp.bfloat16])
    _close(db, db_ref, TOL[jnp.bfloat16])
    ragged = _rand(18, (40, 128), jnp.bfloat16)
    with pytest.raises(ValueError, match="matmul_mosaic cannot take shape M=40"):
        matmul_hopper(ragged, b, interpret=interpret)
    chosen = select("projection", Call(jnp.bfloat16, mnk=(40, 64, 128)), impl="pallas", platform="gpu", capability="9.0")
    assert chosen.kernel == "matmul_triton" and "instead of matmul_mosaic: shape M=40" in chosen.reason
