"""``attention`` through cuDNN: ``jax.nn.dot_product_attention(..., implementation="cudnn")``.

Maps an :class:`~seqmix.ops.attention_call.AttentionCall` (q ``[B, Tq, Hq, D]``, k/v ``[B, S, Hkv, D]``,
``Hkv`` dividing ``Hq``) onto jax.nn's arguments where their meaning is the same:

* ``Full()`` -> no mask; ``Causal()`` -> ``is_causal=True``; ``SlidingWindow(left, 0)`` (``LocalWindow(w)``
  = ``left = w - 1``) -> ``is_causal=True, local_window_size=(left, 0)`` (cuDNN's window of ``left + 1``
  keys, the query's own included). Causal masks need ``Tq == S``: jax.nn's causal diagonal is aligned
  top-left, seqmix's bottom-right (query ``i`` sits at position ``S - Tq + i``).
* GQA / MQA natively (K/V are not repeated); float16 / bfloat16 only; ``D == Dv``, a multiple of 8, at
  most 128 (256 on a Hopper or later GPU at run time; jax's check reads the *default* backend's compute
  capability, so ahead-of-time lowering on a CPU host allows 128).
* Default positions only (:attr:`AttentionCall.default_positions`): jax.nn takes no positions.

``supports`` names why it cannot serve the rest: packed documents (jax.nn exposes per-row lengths
``query_seq_lengths`` / ``key_value_seq_lengths``, i.e. right padding with zero output rows, not segment
ids), sink logits, soft cap, other masks, and ``return_lse`` (jax.nn's ``return_residual`` gives the
logsumexp cast to the input dtype, not seqmix's fp32 lse).

Registered with ``backend="gpu"``: naming ``impl="cudnn"`` for a CPU or TPU trace fails loudly; automatic
dispatch uses it on a GPU only for calls whose :func:`device_case` passed on a real GPU
(``seqmix/ops/gpu/device_results.json``). Evidence: ``gpu:aot`` (``tests/conformance/test_gpu_compile.py``:
an H100 ahead-of-time compile at ``[2, 8192, 16, 128]`` bf16, causal, GQA 32:8 and a 4096 window, forward
and backward). That compile keeps the cuDNN call opaque: XLA builds cuDNN graphs only with a device.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels import _target
from seqmix.ops import _registry
from seqmix.ops import masks as masks_lib
from seqmix.ops.attention_call import AttentionCall, finish

DTYPES = (jnp.dtype(jnp.float16), jnp.dtype(jnp.bfloat16))
HEAD_DIM_MULTIPLE = 8


def _max_head_dim() -> int:
    """jax's limit: 256 when the default backend is a GPU of compute capability >= 9.0, else 128."""
    target = _target.current()
    if target.ahead_of_time or target.platform != "gpu":
        return 128
    capability = getattr(jax.devices()[0], "compute_capability", "0.0")
    return 256 if tuple(int(x) for x in str(capability).split(".")[:2]) >= (9, 0) else 128


def mask_arguments(call: AttentionCall) -> tuple[dict | None, str | None]:
    """jax.nn's mask arguments for ``call.mask`` (``is_causal``, ``local_window_size``), or a reason."""
    mask = call.mask
    if isinstance(mask, masks_lib.Full):
        return {}, None
    if not isinstance(mask, masks_lib.SlidingWindow) or mask.right != 0:
        return None, (f"mask {mask!r}: the cuDNN path of jax.nn.dot_product_attention takes only full, "
                      "causal and causal sliding-window masks (SlidingWindow(left, 0))")
    tq, s = call.q.shape[1], call.k.shape[1]
    if tq != s:
        return None, (f"causal mask with Tq={tq} != S={s}: jax.nn aligns the causal diagonal top-left, "
                      "seqmix bottom-right")
    args = {"is_causal": True}
    if mask.left is not None:
        args["local_window_size"] = (int(mask.left), 0)
    return args, None


def supports(call: AttentionCall) -> str | None:
    dtype = jnp.dtype(call.q.dtype)
    if dtype not in DTYPES:
        return f"dtype {dtype}: cuDNN flash attention takes float16 or bfloat16"
    d, dv = call.q.shape[-1], call.v.shape[-1]
    if dv != d:
        return f"v head_dim {dv} != q head_dim {d}: jax.nn.dot_product_attention needs them equal"
    limit = _max_head_dim()
    if d % HEAD_DIM_MULTIPLE or d > limit:
        return f"head_dim {d}: cuDNN flash attention needs a multiple of {HEAD_DIM_MULTIPLE} <= {limit}"
    if call.return_lse:
        return "return_lse: jax.nn returns the logsumexp only cast to the input dtype, not as fp32"
    if call.sink_logits is not None:
        return "sink logits: jax.nn.dot_product_attention has no sink term"
    if call.soft_cap is not None:
        return "soft cap: jax.nn.dot_product_attention has no logit soft cap"
    if call.q_seg is not None:
        return ("segment_ids (packed documents): jax.nn's cuDNN path takes per-row lengths "
                "(query_seq_lengths / key_value_seq_lengths: right padding), not segment ids")
    if not call.default_positions:
        return "explicit positions: jax.nn.dot_product_attention takes none (kv at 0..S-1, queries aligned)"
    _, reason = mask_arguments(call)
    return reason


def attention_cudnn(call: AttentionCall):
    """``o [B, Tq, Hq, D]`` in the input dtype (``supports`` has refused ``return_lse``)."""
    args, reason = mask_arguments(call)
    if reason:
        raise NotImplementedError(f"cudnn: {reason}")
    o = jax.nn.dot_product_attention(call.q, call.k, call.v, scale=call.scale, implementation="cudnn", **args)
    return finish(call, o, None)


def describe(call: AttentionCall) -> str:
    args, _ = mask_arguments(call)
    settings = ", ".join(f"{k}={v}" for k, v in (args or {}).items())
    return f"jax.nn.dot_product_attention(implementation='cudnn'{', ' + settings if settings else ''})"


def device_case(call: AttentionCall) -> str:
    """The key a real-GPU test records for this call: ``"bfloat16/causal/gqa/d128"``
    (dtype / full, causal or window / mha or gqa / head_dim)."""
    mask = call.mask
    kind = "full" if isinstance(mask, masks_lib.Full) else ("causal" if mask.left is None else "window")
    return f"{jnp.dtype(call.q.dtype).name}/{kind}/{'gqa' if call.groups > 1 else 'mha'}/d{call.q.shape[-1]}"


IMPLEMENTATION = _registry.Implementation(
    "cudnn", attention_cudnn, rank=20, backend="gpu", evidence=("gpu:aot",), supports=supports,
    describe=describe, device_case=device_case, any_mask=False)
