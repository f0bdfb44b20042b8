"""How the two Gated DeltaNet custom ops (convert/modules/ops.py) become ONNX.

torch.onnx translates each custom op into a placeholder node of the `minicpmv` domain (schemas below),
so the traced graph keeps one node per op whatever the prompt length. `lower()` then rewrites every
placeholder, in place:

- fused (default): ONNX Runtime's CPU contrib operators `com.microsoft.CausalConvWithState` (silu)
  and `com.microsoft.LinearAttention` (update_rule gated_delta; q and k L2-normalised before it, as
  the operator does not; the key repeated to the value heads, the layout its schema documents;
  decay is the log-space g and the state [B, H, dk, dv], transformers' own layout);
- portable: standard ONNX only: Concat + grouped Conv + SiLU, and a `Scan` over the tokens carrying
  the recurrent state (the gated-delta rule one token at a time; slower for long prompts).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..spec import TextSpec

DOMAIN = "minicpmv"
MS = "com.microsoft"
_registered = False


def register_schemas() -> None:
    """The placeholder ops' schemas (onnxscript needs one to emit a node)."""
    global _registered
    if _registered:
        return
    from onnx.defs import OpSchema, register_schema

    def schema(name, ins, outs):
        register_schema(OpSchema(
            name, DOMAIN, 1, inputs=[OpSchema.FormalParameter(n, "T") for n in ins],
            outputs=[OpSchema.FormalParameter(n, "T") for n in outs],
            type_constraints=[("T", ["tensor(float)", "tensor(float16)"], "")]))

    schema("CausalConv", ["x", "state", "weight"], ["y", "new_state"])
    schema("GatedDeltaRule", ["q", "k", "v", "g", "beta", "state"], ["out", "new_state"])
    _registered = True


def translation_table() -> dict:
    """torch.onnx's custom_translation_table for the two ops."""
    import onnxscript
    import torch
    from onnxscript.values import Op

    import convert.modules.ops  # noqa: F401  (registers torch.ops.minicpmv.*)

    register_schemas()
    opset = onnxscript.values.Opset(DOMAIN, 1)

    def causal_conv(x, state, weight):
        return Op(opset, "CausalConv")(x, state, weight, _num_outputs=2)

    def gated_delta_rule(q, k, v, g, beta, state):
        return Op(opset, "GatedDeltaRule")(q, k, v, g, beta, state, _num_outputs=2)

    return {torch.ops.minicpmv.causal_conv.default: causal_conv,
            torch.ops.minicpmv.gated_delta_rule.default: gated_delta_rule}


class _Emitter:
    """Builds replacement nodes with unique names."""

    def __init__(self, model: onnx.ModelProto, prefix: str):
        self.model, self.prefix, self.n = model, prefix, 0
        self.nodes: list[onnx.NodeProto] = []

    def name(self, hint: str) -> str:
        self.n += 1
        return f"{self.prefix}/{hint}_{self.n}"

    def const(self, hint: str, value) -> str:
        arr = np.asarray(value)
        n = self.name(hint)
        self.model.graph.initializer.append(numpy_helper.from_array(arr, n))
        return n

    def op(self, op_type: str, inputs: list[str], n_out: int = 1, domain: str = "", outputs=None, **attrs):
        outs = outputs or [self.name(op_type.lower()) for _ in range(n_out)]
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=self.name(op_type), domain=domain, **attrs))
        return outs[0] if n_out == 1 else outs


def _l2norm(e: _Emitter, x: str) -> str:
    """transformers' l2norm: x * rsqrt(sum(x^2, -1) + 1e-6)."""
    ss = e.op("ReduceSum", [e.op("Mul", [x, x]), e.const("axis", np.array([-1], np.int64))], keepdims=1)
    inv = e.op("Reciprocal", [e.op("Sqrt", [e.op("Add", [ss, e.const("eps", np.array(1e-6, np.float32))])])])
    return e.op("Mul", [x, inv])


def _repeat_heads(e: _Emitter, x: str, rep: int, heads: int, dim: int) -> str:
    """[B, T, H, d] -> [B, T, H*rep, d], each head repeated rep times in place (repeat_interleave)."""
    if rep == 1:
        return x
    u = e.op("Unsqueeze", [x, e.const("axis", np.array([3], np.int64))])
    shape = e.op("Concat", [e.op("Shape", [x], start=0, end=2), e.const("hd", np.array([heads, rep, dim], np.int64))], axis=0)
    ex = e.op("Expand", [u, shape])
    return e.op("Reshape", [ex, e.const("shape", np.array([0, 0, heads * rep, dim], np.int64))])


def _conv_fused(e: _Emitter, node, text: TextSpec) -> None:
    x, state, w = node.input
    e.op("CausalConvWithState", [x, w, "", state], 2, domain=MS, outputs=list(node.output), activation="silu")


def _conv_portable(e: _Emitter, node, text: TextSpec) -> None:
    x, state, w = node.input
    full = e.op("Concat", [state, x], axis=2)
    y = e.op("Conv", [full, w], group=text.linear_conv_dim)
    e.op("Mul", [y, e.op("Sigmoid", [y])], outputs=[node.output[0]])
    k1 = text.conv_kernel - 1
    e.op("Slice", [full, e.const("start", np.array([-k1], np.int64)), e.const("end", np.array([2**62], np.int64)),
                   e.const("axis", np.array([2], np.int64))], outputs=[node.output[1]])


def _gdn_fused(e: _Emitter, node, text: TextSpec) -> None:
    q, k, v, g, beta, state = node.input
    hk, hv, dk, dv = (text.linear_num_key_heads, text.linear_num_value_heads, text.linear_key_head_dim,
                      text.linear_value_head_dim)
    pack = e.const("packed", np.array([0, 0, -1], np.int64))
    qn = e.op("Reshape", [_l2norm(e, q), pack])
    kn = e.op("Reshape", [_repeat_heads(e, _l2norm(e, k), hv // hk, hk, dk), pack])
    vp = e.op("Reshape", [v, pack])
    out = e.op("LinearAttention", [qn, kn, vp, state, g, beta], 2, domain=MS,
               outputs=[e.name("la_out"), node.output[1]], q_num_heads=hk, kv_num_heads=hv, update_rule="gated_delta")
    e.op("Reshape", [out[0], e.const("unpacked", np.array([0, 0, hv, dv], np.int64))], outputs=[node.output[0]])


def _scan_body(text: TextSpec) -> onnx.GraphProto:
    """One token of the gated-delta rule: state [B, H, dk, dv]; q_t, k_t [B, H, dk]; v_t [B, H, dv];
    g_t, beta_t [B, H] -> new state, o_t [B, H, dv]."""
    f = TensorProto.FLOAT
    vi = helper.make_tensor_value_info
    nodes = [
        helper.make_node("Unsqueeze", ["g", "ax23"], ["g4"]),
        helper.make_node("Exp", ["g4"], ["decay"]),
        helper.make_node("Mul", ["s_in", "decay"], ["s_dec"]),
        helper.make_node("Unsqueeze", ["k", "ax2"], ["k_row"]),  # [B, H, 1, dk]
        helper.make_node("MatMul", ["k_row", "s_dec"], ["kv_mem"]),  # [B, H, 1, dv]
        helper.make_node("Unsqueeze", ["v", "ax2"], ["v_row"]),
        helper.make_node("Sub", ["v_row", "kv_mem"], ["diff"]),
        helper.make_node("Unsqueeze", ["beta", "ax23"], ["b4"]),
        helper.make_node("Mul", ["diff", "b4"], ["delta"]),  # [B, H, 1, dv]
        helper.make_node("Unsqueeze", ["k", "ax3"], ["k_col"]),  # [B, H, dk, 1]
        helper.make_node("MatMul", ["k_col", "delta"], ["upd"]),
        helper.make_node("Add", ["s_dec", "upd"], ["s_out"]),
        helper.make_node("Unsqueeze", ["q", "ax2"], ["q_row"]),
        helper.make_node("MatMul", ["q_row", "s_out"], ["o4"]),
        helper.make_node("Squeeze", ["o4", "ax2"], ["o"]),
    ]
    inits = [numpy_helper.from_array(np.array(a, np.int64), n) for n, a in
             (("ax2", [2]), ("ax3", [3]), ("ax23", [2, 3]))]
    H, dk, dv = text.linear_num_value_heads, text.linear_key_head_dim, text.linear_value_head_dim
    return helper.make_graph(
        nodes, "gated_delta_step",
        [vi("s_in", f, ["B", H, dk, dv]), vi("q", f, ["B", H, dk]), vi("k", f, ["B", H, dk]), vi("v", f, ["B", H, dv]),
         vi("g", f, ["B", H]), vi("beta", f, ["B", H])],
        [vi("s_out", f, ["B", H, dk, dv]), vi("o", f, ["B", H, dv])], inits)


def _gdn_portable(e: _Emitter, node, text: TextSpec) -> None:
    q, k, v, g, beta, state = node.input
    hk, hv, dk = text.linear_num_key_heads, text.linear_num_value_heads, text.linear_key_head_dim
    scale = e.const("scale", np.array(dk ** -0.5, np.float32))
    qn = _repeat_heads(e, e.op("Mul", [_l2norm(e, q), scale]), hv // hk, hk, dk)
    kn = _repeat_heads(e, _l2norm(e, k), hv // hk, hk, dk)
    # Scan runs along axis 1 (tokens) of each input and stacks o_t along axis 1 -> [B, T, H, dv]
    e.op("Scan", [state, qn, kn, v, g, beta], 2, outputs=[node.output[1], node.output[0]],
         body=_scan_body(text), num_scan_inputs=5, scan_input_axes=[1] * 5, scan_output_axes=[1])


_LOWER = {
    ("CausalConv", False): _conv_fused, ("CausalConv", True): _conv_portable,
    ("GatedDeltaRule", False): _gdn_fused, ("GatedDeltaRule", True): _gdn_portable,
}


def lower(model: onnx.ModelProto, text: TextSpec, *, portable: bool) -> dict[str, int]:
    """Rewrite every placeholder node of `model` (in place); returns {op: count}. The opset imports
    gain com.microsoft (fused) and lose the placeholder domain."""
    counts: dict[str, int] = {}
    new_nodes: list[onnx.NodeProto] = []
    for node in model.graph.node:
        if node.domain != DOMAIN:
            new_nodes.append(node)
            continue
        e = _Emitter(model, node.name or node.op_type)
        _LOWER[(node.op_type, portable)](e, node, text)
        new_nodes.extend(e.nodes)
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    del model.graph.node[:]
    model.graph.node.extend(new_nodes)
    imports = [o for o in model.opset_import if o.domain != DOMAIN]
    if not portable and counts and not any(o.domain == MS for o in imports):
        imports.append(helper.make_opsetid(MS, 1))
    del model.opset_import[:]
    model.opset_import.extend(imports)
    return counts


KEEP = "num_logits_to_keep"


def add_logits_to_keep(model: onnx.ModelProto) -> None:
    """An optional decoder input `num_logits_to_keep` (int64 scalar; 0, its default, keeps every position):
    the LM head runs on the last k positions only. A prompt's prefill needs one row, and the
    full-vocabulary rows of every other position were half of a 512-token prefill on the full-size model."""
    g = model.graph
    head = next(n for n in g.node if "logits" in n.output)
    x = head.input[0]
    g.input.append(helper.make_tensor_value_info(KEEP, TensorProto.INT64, []))
    g.initializer.append(numpy_helper.from_array(np.array(0, np.int64), KEEP))  # the default: all positions
    e = _Emitter(model, "logits_to_keep")
    k = e.op("Reshape", [KEEP, e.const("one", np.array([1], np.int64))])
    start = e.op("Where", [e.op("Greater", [k, e.const("zero", np.array([0], np.int64))]), e.op("Neg", [k]),
                           e.const("zero", np.array([0], np.int64))])
    last = e.op("Slice", [x, start, e.const("end", np.array([2**62], np.int64)), e.const("axis", np.array([1], np.int64))])
    head.input[0] = last
    i = list(g.node).index(head)
    for n in reversed(e.nodes):
        g.node.insert(i, n)
