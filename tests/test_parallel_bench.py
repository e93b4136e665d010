"""The parallelism benchmark's byte formulas (benchmarks/parallel_traffic.py): the real model's
widths as the issue states them, and every formula against the collectives two gloo ranks issue."""

from __future__ import annotations

import pytest

from sencache.benchmarks.parallel import measure_traffic, tiny_bundle
from sencache.benchmarks.parallel_traffic import H100_BF16, NVLINK4, attention_bytes, projection, widths

WAN_14B_FLOPS = {"head": 9.8e10, "blocks": 6.5e15, "tail": 5.0e10}


def test_wan_14b_at_720p_has_the_published_widths():
    w = widths("wan2.1-t2v-14b")
    assert (w.tokens, w.heads, w.head_dim, w.blocks, w.latent) == (75_600, 40, 128, 40, 16 * 21 * 90 * 160)
    # sp=8, both rows of one guided sample, bf16: 40 blocks x 2 rows x 4 tensors x 9,450 tokens x 5,120 x 2 B
    assert attention_bytes(w, 2, 8, 2) == {"all_to_all": 40 * 2 * 4 * 9_450 * 5_120 * 2, "all_gather": 0}


def test_cfg_alone_exchanges_one_row_and_sequence_parallelism_splits_the_blocks():
    w = widths("wan2.1-t2v-14b")
    alone = projection(w, 1, 2, 1, 2, WAN_14B_FLOPS, NVLINK4, H100_BF16)
    assert alone["attention_bytes"] == alone["tokens_bytes"] == 0
    assert alone["branches_bytes"] == w.latent * 4  # one row of float32 output to the other branch
    split = projection(w, 4, 2, 1, 2, WAN_14B_FLOPS, NVLINK4, H100_BF16)
    per_gpu = WAN_14B_FLOPS["head"] + WAN_14B_FLOPS["tail"] + WAN_14B_FLOPS["blocks"] / 4  # head, tail whole
    assert split["compute_s"] == pytest.approx(alone["compute_s"] * per_gpu / sum(WAN_14B_FLOPS.values()))
    assert 0 < split["comm_share"] < 1


def test_an_unsupported_family_is_refused_by_name():
    with pytest.raises(ValueError, match="^model: no traffic formula for the ltx family"):
        widths("tiny-ltx")


@pytest.fixture(scope="module")
def calibrated_torch_wan(bundle_cache):
    return bundle_cache.get("parallel-bench", lambda out: tiny_bundle("tiny-wan", out), model="tiny-wan")


@pytest.mark.slow
@pytest.mark.parametrize("parallel", ["sp=2", "cfg=2"])
def test_the_formulas_equal_what_two_gloo_ranks_exchange(calibrated_torch_wan, parallel, tmp_path):
    traffic = measure_traffic("tiny-wan", calibrated_torch_wan, parallel, 2, 3, tmp_path)
    assert traffic["matches"] == {"attention": True, "tokens": True, "branches": True, "decision": True}
    assert traffic["ranks_agree"]
    moved = {k: v > 0 for k, v in traffic["per_pass"].items() if k != "boundary"}
    assert moved == {"attention": parallel == "sp=2", "tokens": parallel == "sp=2", "branches": parallel == "cfg=2"} | {
        "decision": True
    }
