"""Placement plans, cluster-fit checks, rank layout and startup validation (no Ray, no model)."""

import pytest

from fleetlm.engine.args import EngineArgs, validate_parallel
from fleetlm.engine.config import ModelConfig, ParallelConfig
from fleetlm.parallel.distributed import backend_for, global_rank, split_rank
from fleetlm.parallel.placement import (
    PlacementError,
    PlacementSpec,
    assign_bundles,
    check_cluster_fits,
    stage_bundles,
)

GPU = PlacementSpec(resource="GPU", per_worker=1.0)


# -- specs and bundles ------------------------------------------------------------
def test_spec_for_device():
    cuda = PlacementSpec.for_device("cuda")
    assert cuda.worker_resources() == {"GPU": 1.0, "CPU": 1.0}
    assert cuda.actor_options() == {"num_cpus": 1.0, "num_gpus": 1.0}
    cpu = PlacementSpec.for_device("cpu")
    assert cpu.worker_resources() == {"CPU": 0.01}
    assert cpu.actor_options() == {"num_cpus": 0.01, "num_gpus": 0.0}
    fake = PlacementSpec(resource="fake_gpu")
    assert fake.actor_options() == {"num_cpus": 0.0, "num_gpus": 0.0, "resources": {"fake_gpu": 1.0}}


def test_spec_rejects_bad_values():
    with pytest.raises(ValueError, match="per_worker"):
        PlacementSpec(per_worker=0)
    with pytest.raises(ValueError, match="strategy"):
        PlacementSpec(strategy="SOMEWHERE")
    with pytest.raises(ValueError, match="cpus_per_worker"):
        PlacementSpec(cpus_per_worker=-1)


def test_stage_bundles_one_per_stage():
    assert stage_bundles(GPU, 4, 2) == [{"GPU": 4.0}, {"GPU": 4.0}]
    assert stage_bundles(PlacementSpec.for_device("cuda"), 2, 3) == [{"GPU": 2.0, "CPU": 2.0}] * 3
    assert stage_bundles(PlacementSpec(resource="fake_gpu"), 3, 1) == [{"fake_gpu": 3.0}]


# -- fail fast on clusters that can never hold the replica ---------------------------
def test_cluster_fits():
    check_cluster_fits(GPU, 4, 2, [{"GPU": 8, "CPU": 96}])
    check_cluster_fits(GPU, 4, 2, [{"GPU": 4}, {"GPU": 4}, {"CPU": 8}])
    check_cluster_fits(GPU, 2, 3, [{"GPU": 4}, {"GPU": 2}])


def test_cluster_too_small_names_the_numbers():
    with pytest.raises(PlacementError) as e:
        check_cluster_fits(GPU, 4, 2, [{"GPU": 4, "CPU": 8}, {"CPU": 8}])
    msg = str(e.value)
    assert "tensor_parallel_size (4) x pipeline_parallel_size (2) = 8 workers" in msg
    assert "need 8 GPU" in msg and "has 4 GPU" in msg and "2 node(s)" in msg


def test_cluster_without_the_resource():
    with pytest.raises(PlacementError, match="need 2 fake_gpu but the cluster has 0 fake_gpu"):
        check_cluster_fits(PlacementSpec(resource="fake_gpu"), 2, 1, [{"CPU": 2}])


def test_stage_must_fit_one_node():
    # 8 GPUs in total, but no node holds a 4-GPU stage.
    with pytest.raises(PlacementError) as e:
        check_cluster_fits(GPU, 4, 2, [{"GPU": 2}] * 4)
    msg = str(e.value)
    assert "tensor_parallel_size (4)" in msg and "largest: 2 GPU" in msg and "pipeline_parallel_size is 2" in msg
    # 6 GPUs = 3+3: one stage of 2 fits on each node, but three stages do not.
    with pytest.raises(PlacementError, match="hold only 2 such stage"):
        check_cluster_fits(GPU, 2, 3, [{"GPU": 3}, {"GPU": 3}])


def test_cpus_per_worker_are_checked_too():
    spec = PlacementSpec.for_device("cuda")
    with pytest.raises(PlacementError, match="need 2 CPU but the cluster has 1 CPU"):
        check_cluster_fits(spec, 2, 1, [{"GPU": 8, "CPU": 1}])


# -- rank -> bundle plans --------------------------------------------------------------
def test_own_group_stage_s_goes_to_bundle_s():
    bundles = stage_bundles(GPU, 2, 3)
    assert assign_bundles(GPU, 2, 3, bundles, ["a", "b", "a"]) == [0, 0, 1, 1, 2, 2]


def test_serve_style_per_worker_bundles_pack_stages_by_node():
    # Ray Serve's layout: bundle 0 for the replica actor, then one per worker,
    # placed by PACK over two nodes in an interleaved order.
    # What is still free of each bundle (the replica actor took bundle 0's CPU):
    bundles = [{"CPU": 0}] + [{"GPU": 1}] * 4
    nodes = ["n0", "n0", "n1", "n0", "n1"]
    plan = assign_bundles(GPU, 2, 2, bundles, nodes)
    assert plan == [1, 3, 2, 4]
    by_stage = [{nodes[b] for b in plan[s * 2 : s * 2 + 2]} for s in range(2)]
    assert by_stage == [{"n0"}, {"n1"}]


def test_cpu_workers_share_a_bundle():
    spec = PlacementSpec.for_device("cpu")
    free = [{"CPU": 0.0}, {"CPU": 1.0}, {"CPU": 1.0}]  # the replica took bundle 0
    assert assign_bundles(spec, 3, 2, free, ["n", "n", "n"]) == [1, 1, 1, 1, 1, 1]


def test_serve_style_stage_bundles_best_fit():
    # cluster/app.py's layout on CPU: the replica's {"CPU": 1} bundle, then one
    # bundle per stage. Even if the replica's use of bundle 0 is not visible
    # yet, each stage goes to its own stage-sized bundle.
    spec = PlacementSpec.for_device("cpu")
    free = [{"CPU": 1.0}] + stage_bundles(spec, 3, 2)
    assert assign_bundles(spec, 3, 2, free, ["n"] * 3) == [1, 1, 1, 2, 2, 2]
    gpu = PlacementSpec.for_device("cuda")
    free = [{"CPU": 0.0}] + stage_bundles(gpu, 2, 2)
    assert assign_bundles(gpu, 2, 2, free, ["a", "a", "b"]) == [1, 1, 2, 2]


def test_stage_split_over_nodes_only_when_unavoidable(caplog):
    bundles = [{"GPU": 1}] * 4
    with caplog.at_level("WARNING", logger="fleetlm.placement"):
        plan = assign_bundles(GPU, 2, 2, bundles, ["a", "b", "c", "d"])
    assert plan == [0, 1, 2, 3]
    assert "do not fit on one node" in caplog.text


def test_group_too_small():
    with pytest.raises(PlacementError, match="hold 3 workers"):
        assign_bundles(GPU, 2, 2, [{"GPU": 1}] * 3, ["a"] * 3)


# -- rank layout -------------------------------------------------------------------------
def test_rank_layout_stage_major():
    tp = 3
    ranks = [global_rank(t, p, tp) for p in range(2) for t in range(tp)]
    assert ranks == list(range(6))
    assert [split_rank(r, tp) for r in ranks] == [(0, 0), (1, 0), (2, 0), (0, 1), (1, 1), (2, 1)]
    assert backend_for("cpu") == "gloo" and backend_for("cuda:0") == "nccl"


# -- startup validation of the parallel shape (names the numbers) ----------------------
def _config(**kw):
    return EngineArgs(model="tiny-llama-8h4kv", load_format="dummy", device="cpu", **kw).create_engine_config()


def test_heads_not_divisible_by_tp():
    with pytest.raises(ValueError, match=r"num_attention_heads \(8\) is not divisible by tensor_parallel_size \(3\)"):
        _config(tensor_parallel_size=3)


def test_kv_heads_and_tp_must_divide():
    # 12 query heads, 8 KV heads: TP=6 splits the query heads but neither
    # splits nor replicates the KV heads evenly.
    hf = {"num_attention_heads": 12, "num_key_value_heads": 8, "num_hidden_layers": 2, "hidden_size": 768}
    model = ModelConfig("m", "m", "dummy", None, hf, "float32", 128)
    with pytest.raises(ValueError, match=r"num_key_value_heads \(8\) and tensor_parallel_size \(6\)"):
        validate_parallel(model, ParallelConfig(6, 1, "cpu"))
    validate_parallel(model, ParallelConfig(4, 2, "cpu"))
    # Fewer KV heads than ranks: replicated when the ranks are a multiple.
    cfg = _config(tensor_parallel_size=8)  # 8 heads, 4 KV heads: each KV head on 2 ranks
    assert cfg.parallel.world_size == 8


def test_more_stages_than_layers():
    with pytest.raises(ValueError, match=r"num_hidden_layers \(4\) is fewer than pipeline_parallel_size \(5\)"):
        _config(pipeline_parallel_size=5)


def test_sizes_must_be_positive():
    with pytest.raises(ValueError, match="tensor_parallel_size must be a positive integer"):
        _config(tensor_parallel_size=0)
