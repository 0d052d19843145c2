"""Where actors run and what they hold: the mesh in the spec and on the CLI, GPU/TPU actor
resources from Ray's own TPU sizing, and preflight refusals of a mesh or a model that one
actor's devices cannot hold (from the checkpoint's config alone)."""

from __future__ import annotations

import json

import pytest

from jobs.cli import build_parser, main
from jobs.flags import spec_from_args
from pipeline.errors import InputError
from pipeline.preflight import check_placement
from pipeline.ray_env import actor_options, devices_per_actor
from pipeline.spec import SpecError, build_spec

BASE = {"input": "in/", "output": "out/"}
# Gemma 2 27B's published config (the fields our reader uses): 27.2 B parameters.
GEMMA2_27B = {"model_type": "gemma2", "hidden_size": 4608, "num_hidden_layers": 46,
              "num_attention_heads": 32, "num_key_value_heads": 16, "head_dim": 128,
              "intermediate_size": 36864, "vocab_size": 256000, "sliding_window": 4096,
              "query_pre_attn_scalar": 144, "attn_logit_softcapping": 50.0,
              "final_logit_softcapping": 30.0, "max_position_embeddings": 8192}


def _spec(**kw):
    return build_spec({**BASE, **kw})


def test_mesh_flag_and_field():
    args = build_parser().parse_args(["run", "--input", "i", "--output", "o", "--mesh", "2x4",
                                      "--accelerator", "gpu", "--gpus-per-actor", "8"])
    spec = spec_from_args(args)
    assert spec.mesh.shape == (2, 4) and spec.resources.gpus_per_actor == 8
    with pytest.raises(SystemExit):
        build_parser().parse_args(["run", "--mesh", "2by4"])
    with pytest.raises(SpecError, match="mesh.model"):
        _spec(mesh={"data": 2, "model": 0})


def test_gpu_actors_claim_their_gpus():
    opts = actor_options(_spec(resources={"accelerator": "gpu", "gpus_per_actor": 4,
                                          "extra_resources": {"big_node": 1}}), 16)
    assert opts["num_gpus"] == 4 and opts["resources"] == {"big_node": 1}


@pytest.mark.parametrize("topology, acc, chips, head", [
    ("2x4", "TPU-V6E", 8, "TPU-v6e-8-head"),  # one 8-chip host: one actor per slice
    ("2x4", "TPU-V5LITEPOD", 8, "TPU-v5litepod-8-head"),
    ("4x4", "TPU-V6E", 4, None),  # a 4-host slice: one actor per 4-chip host
    ("2x2x2", "TPU-V4", 4, None),
])
def test_tpu_actor_holds_a_host(topology, acc, chips, head):
    spec = _spec(resources={"accelerator": "tpu", "tpu_topology": topology,
                            "accelerator_type": acc})
    res = actor_options(spec, 200)["resources"]
    assert res["TPU"] == chips == devices_per_actor(spec)
    assert res.get(head, 0) == (1 if head else 0) and len(res) == (2 if head else 1)


def test_several_tpu_actors_per_host():
    spec = _spec(resources={"accelerator": "tpu", "tpu_topology": "2x4",
                            "accelerator_type": "TPU-V6E", "tpu_chips": 2})
    assert actor_options(spec, 200)["resources"] == {"TPU": 2}
    too_many = _spec(resources={"accelerator": "tpu", "tpu_topology": "2x4",
                                "accelerator_type": "TPU-V6E", "tpu_chips": 16})
    with pytest.raises(InputError, match="a host of a v6e-8 slice has 8 chips"):
        actor_options(too_many, 200)
    with pytest.raises(SpecError, match="tpu_topology needs accelerator_type"):
        _spec(resources={"accelerator": "tpu", "tpu_topology": "2x4"})
    with pytest.raises(SpecError, match="only apply to accelerator 'tpu'"):
        _spec(resources={"accelerator": "gpu", "tpu_chips": 4})


def test_mesh_must_cover_the_actor_devices():
    spec = _spec(mesh={"data": 2, "model": 2},
                 resources={"accelerator": "tpu", "tpu_topology": "2x4",
                            "accelerator_type": "TPU-V6E"})
    with pytest.raises(InputError) as e:
        check_placement(spec)
    assert str(e.value) == ("mesh 2x2 spans 4 devices but each actor holds 8 TPU chips; make "
                            "data x model = 8, or leave mesh out to have it chosen")
    check_placement(_spec(mesh={"data": 2, "model": 4},
                          resources={"accelerator": "tpu", "tpu_topology": "2x4",
                                     "accelerator_type": "TPU-V6E"}))


def test_too_big_a_model_is_refused_with_the_chips_it_needs(tmp_path, capsys):
    ckpt = tmp_path / "gemma-2-27b"
    ckpt.mkdir()
    (ckpt / "config.json").write_text(json.dumps(GEMMA2_27B))
    v5e = {"accelerator": "tpu", "accelerator_type": "TPU-V5LITEPOD", "tpu_chips": 4}
    # 27.2e9 bf16 parameters = 54.5 GB; a 16 GiB v5e chip holds 0.75 x 17.2 GB of them: 5 chips.
    with pytest.raises(InputError) as e:
        check_placement(_spec(model=str(ckpt), resources=v5e))
    assert str(e.value) == (
        f"model {ckpt} (54.5 GB of bfloat16 parameters) needs 5 TPU chips of 16 GiB "
        "(TPU-V5LITEPOD), but each actor holds 4; set resources.tpu_chips to at least 5")
    check_placement(_spec(model=str(ckpt), resources={**v5e, "tpu_chips": 8}))
    with pytest.raises(InputError, match="mesh 4x2 splits it over 2; use a model axis of at "
                                         "least 5"):
        check_placement(_spec(model=str(ckpt), mesh={"data": 4, "model": 2},
                              resources={**v5e, "tpu_chips": 8}))
    # 8 x 80 GB H100s hold it; 1 L4 does not (the CLI: one line, exit 2, nothing written).
    check_placement(_spec(model=str(ckpt), resources={"accelerator": "gpu",
                                                      "accelerator_type": "H100"}))
    inp = tmp_path / "in.parquet"
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["a"]}), inp)
    out = tmp_path / "out"
    code = main(["validate", "--input", str(inp), "--output", str(out), "--model", str(ckpt),
                 "--accelerator", "gpu", "--accelerator-type", "L4"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and not out.exists()
    assert err.splitlines() == [
        f"gemma-batch: error: model {ckpt} (54.5 GB of bfloat16 parameters) needs 3 GPUs of 24 "
        "GiB (L4), but each actor holds 1; set resources.gpus_per_actor to at least 3"]
