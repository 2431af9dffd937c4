"""benchmarks/step_model.py and scaling_model.py: the network and step model against what it must reproduce
(the measured single-GPU step it starts from, the collective formula, overlap bounds, what each engine sends),
and the script end to end on the recorded measurements."""

import json
import math

import pytest

from benchmarks import scaling_model as sm
from benchmarks import step_model as st
from scaletrain.model import get_model_config
from scaletrain.model.flops import block_tensor_sizes


def test_collective_time_is_nccls_ring_formula():
    net = st.Network()
    assert net.collective(1e9, 1) == 0.0
    # one node: latency base + 7 NVLink hops, bandwidth over NVLink
    t8 = net.collective(1e9, 8)
    assert t8 == pytest.approx((8.4 + 7 * 3.4) * 1e-6 + 7 / 8 * 1e9 / 360e9)
    # 64 GPUs on 8 nodes: 56 NVLink hops + 7 network hops, the ring at the slower of NVLink and the node's NICs
    slow = st.Network(nic_gbps=100, nic_efficiency=1.0)  # 8 x 100 Gb/s = 100 GB/s a node
    t64 = slow.collective(1e9, 64)
    assert t64 == pytest.approx((8.4 + 56 * 3.4 + 7 * 9.6) * 1e-6 + 63 / 64 * 1e9 / 100e9)
    assert slow.collective(1e9, 64, pieces=3) - t64 == pytest.approx(2 * (8.4 + 56 * 3.4 + 7 * 9.6) * 1e-6)


def test_one_gpu_reproduces_the_measured_step():
    """The compute efficiency taken from a measured point, put back into the model at one GPU on that device,
    gives that point's tokens/s: the blocks' and root's FLOPs add up to the model's, the optimizer is counted once."""
    measured = sm.load_measured(sm.DEFAULT_MEASURED)
    assert {(m.model, m.engine, m.compiled) for m in measured} >= {("base", "fsdp", False), ("large", "fsdp", True)}
    for path in sm.DEFAULT_MEASURED:
        data = json.loads(path.read_text())
        a = data["args"]
        mc = get_model_config(a["model_size"], n_layers=a["num_layers"])
        dev = st.device("NVIDIA H200")
        for row in (r for r in data["rows"] if r["status"] == "ok"):
            point = next(m for m in measured if m.source.startswith(f"{path.parent.name} {row['engine']} mb "
                                                                   f"{row['micro_batch']} "))
            case = st.Case(mc, row["engine"], 1, row["micro_batch"], a["seq"])
            got = st.step_time(case, point.eta, dev, st.Network(), overlap=True)
            assert got["tokens_per_s_per_gpu"] == pytest.approx(row["tokens_per_s"], rel=1e-9)
            assert got["comm_s"] == 0.0


def test_overlap_is_bounded_and_engines_send_what_they_do():
    mc = get_model_config("large")
    dev = st.device("H100")
    slow = st.Network(nic_gbps=25)  # a network slow enough for communication to matter
    for engine in ("fsdp", "zero3"):
        case = st.Case(mc, engine, 64, 4, 2048)
        o, w = (st.step_time(case, 0.4, dev, slow, x) for x in (True, False))
        assert o["compute_s"] + o["optimizer_s"] < o["step_s"] < w["step_s"]
        assert w["step_s"] == pytest.approx(w["compute_s"] + w["comm_s"] + w["optimizer_s"])
        assert o["step_s"] >= max(o["compute_s"], o["comm_s"])  # neither can hide more than the other's length
    # gradient accumulation: FSDP2 reduce-scatters on the last micro-batch only, ZeRO-3 on each
    pb = sum(block_tensor_sizes(mc))
    net = st.Network()
    ag, rs = net.collective(2 * pb, 64), net.collective(4 * pb, 64, pieces=math.ceil(pb / 5e7))
    f1, f4 = (st.step_time(st.Case(mc, "fsdp", 64, 4, 2048, accum=k), 0.4, dev, net, False) for k in (1, 4))
    z1, z4 = (st.step_time(st.Case(mc, "zero3", 64, 4, 2048, accum=k), 0.4, dev, net, False) for k in (1, 4))
    L, root = mc.n_layers, 2 * mc.vocab_size * mc.d_model + mc.d_model  # large: lm_head not tied
    assert f4["comm_s"] - f1["comm_s"] == pytest.approx(3 * (2 * L - 1) * ag + 3 * net.collective(2 * root, 64))
    assert z4["comm_s"] == pytest.approx(4 * z1["comm_s"])
    assert z1["comm_s"] > f1["comm_s"] and rs > ag
    # ZeRO-3 gathers per submodule it fetches (the block's 7 Linears; its norms stay whole), FSDP2 per block
    assert z1["block_allgather_s"] == pytest.approx(net.collective(2 * pb, 64, pieces=7))
    assert f1["block_allgather_s"] == pytest.approx(ag)


def test_the_script_predicts_and_checks(tmp_path, capsys):
    sm.main(["--output", str(tmp_path)])
    out = json.loads((tmp_path / "scaling_model.json").read_text())
    text = (tmp_path / "scaling_model.txt").read_text()
    ok = [r for r in out["predictions"] if r["status"] == "ok"]
    assert {(r["model"], r["engine"], r["gpus"]) for r in ok} >= {
        (m, e, n) for m in ("base", "large") for e in ("fsdp", "zero3") for n in (8, 64, 512)}
    for r in ok:
        assert r["estimate_gib"] <= out["device"]["memory_gib"]
        assert 0 < r["no_overlap"]["mfu"] <= r["overlap"]["mfu"] <= r["eta"] + 1e-9
    refs = {(c["reference"], c["gpus"], c["compiled"]): c for c in out["checks"]}
    tt = refs[("torchtitan Llama-3.1-8B", 8, False)]
    assert tt["published"] == 5762 and tt["error"] == pytest.approx(tt["predicted"] / 5762 - 1)
    assert ("llm-foundry MPT-7B", 8, False) in refs
    assert out["scaling_checks"] and "error" in text and "torchtitan" in capsys.readouterr().out
